//! The `zstd_frame` target: one zstd frame and the raw length an index records for it.

use std::path::Path;

use bigmodel_store::codec::{check_frame_header, compress, decompress_into};

use super::{Outcome, Target};

/// The input's first 4 bytes (little endian, below 1 MiB) are the recorded raw length, the
/// rest the frame: decoded into exactly that many bytes, as an independent streaming decoder
/// decodes it, or refused.
pub struct ZstdTarget {
    seeds: Vec<Vec<u8>>,
    tokens: Vec<Vec<u8>>,
}

fn framed(raw_length: u32, frame: &[u8]) -> Vec<u8> {
    let mut input = raw_length.to_le_bytes().to_vec();
    input.extend_from_slice(frame);
    input
}

impl ZstdTarget {
    pub fn new() -> ZstdTarget {
        let raw: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let without_size = {
            let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
            std::io::Write::write_all(&mut encoder, &raw).expect("encode");
            encoder.finish().expect("encode")
        };
        ZstdTarget {
            seeds: vec![
                framed(3000, &compress(&raw, 3).expect("compress")),
                framed(3000, &without_size),
                framed(0, &compress(&[], 3).expect("compress")),
                framed(8, &compress(&[1; 8], 19).expect("compress")),
            ],
            tokens: vec![b"\x28\xb5\x2f\xfd".to_vec(), vec![0; 4], vec![0xff; 4]],
        }
    }
}

impl Target for ZstdTarget {
    fn seeds(&self) -> &[Vec<u8>] {
        &self.seeds
    }

    fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    fn run(&self, input: &[u8]) -> Result<Outcome, String> {
        let Some((length, frame)) = input.split_first_chunk::<4>() else {
            return Ok(Outcome::Refused);
        };
        let raw_length = u32::from_le_bytes(*length) % (1 << 20);
        let (path, tensor) = (Path::new("blob.bin"), "t");
        if check_frame_header(frame, raw_length.into(), path, tensor).is_err() {
            return Ok(Outcome::Refused);
        }
        let mut out = vec![0u8; raw_length as usize];
        if decompress_into(frame, &mut out, path, tensor).is_err() {
            return Ok(Outcome::Refused);
        }
        // An independent decoder (streaming, bounded) must agree on what the frame holds.
        let mut reference = Vec::new();
        let decoded = zstd::stream::read::Decoder::new(frame).and_then(|decoder| {
            std::io::Read::read_to_end(
                &mut std::io::Read::take(decoder.single_frame(), u64::from(raw_length) + 1),
                &mut reference,
            )
        });
        match decoded {
            Ok(_) if reference == out => Ok(Outcome::Accepted),
            _ => Err("accepted a frame the streaming decoder decodes otherwise".to_owned()),
        }
    }
}
