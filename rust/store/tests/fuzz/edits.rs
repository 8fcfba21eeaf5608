//! The edits a fuzz input applies to a seed. Positions and choices are taken modulo what is
//! there, so every generated edit applies to any input.

use bolero::TypeGenerator;

use super::Target;

/// Inputs never grow past this (an edit that would is cut back).
const MAX_INPUT: usize = 1 << 16;

const INTERESTING_BYTES: &[u8] = b"\x00\x01\x7f\x80\xff\"\\{}[],:-0123456789 .eE";
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "-0",
    "2",
    "7",
    "63",
    "64",
    "65",
    "128",
    "4095",
    "4096",
    "4097",
    "65536",
    "100000000",
    "100000001",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551552",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "0.5",
    "1e2",
];

/// Choices made by a structure-aware edit, drawn from the fuzz input (so a coverage-guided
/// engine steers them like any other byte).
#[derive(Debug, Clone, TypeGenerator)]
pub struct Picks {
    choices: [u16; 8],
    value: u64,
    next: u8,
}

impl Picks {
    /// A choice in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        let choice = self.choices[self.next as usize % self.choices.len()];
        self.next = self.next.wrapping_add(1);
        choice as usize % n.max(1)
    }

    /// A full-width number (offsets, checksums, length fields).
    pub fn value(&self) -> u64 {
        self.value
    }
}

#[derive(Debug, Clone, TypeGenerator)]
pub enum Edit {
    FlipBit {
        at: u32,
        bit: u8,
    },
    SetByte {
        at: u32,
        byte: u8,
    },
    Delete {
        at: u32,
        len: u8,
    },
    Duplicate {
        at: u32,
        len: u8,
        to: u32,
    },
    InsertToken {
        at: u32,
        token: u16,
    },
    InsertBytes {
        at: u32,
        bytes: Vec<u8>,
    },
    ReplaceNumber {
        from: u32,
        number: u8,
    },
    Truncate {
        at: u32,
    },
    /// Cut here and continue with another seed from `from` on.
    Splice {
        at: u32,
        seed: u8,
        from: u32,
    },
    /// A safetensors length field (the first 8 bytes) set near the truth or to an extreme.
    LengthField {
        choice: u8,
    },
    /// One field of the parsed document changed (see [`Target::restructure`]).
    Restructure(Picks),
}

impl Edit {
    pub fn apply(&self, mut data: Vec<u8>, target: &dyn Target, seeds: &[Vec<u8>]) -> Vec<u8> {
        let at = |at: u32, len: usize| at as usize % (len + 1);
        match self {
            Edit::FlipBit { at: i, bit } if !data.is_empty() => {
                let i = *i as usize % data.len();
                data[i] ^= 1 << (bit % 8);
            }
            Edit::SetByte { at: i, byte } if !data.is_empty() => {
                let i = *i as usize % data.len();
                data[i] = INTERESTING_BYTES[*byte as usize % INTERESTING_BYTES.len()];
            }
            Edit::Delete { at: i, len } => {
                let start = at(*i, data.len());
                let end = (start + 1 + *len as usize % 16).min(data.len());
                data.drain(start..end.max(start));
            }
            Edit::Duplicate { at: i, len, to } => {
                let start = at(*i, data.len());
                let end = (start + 1 + *len as usize).min(data.len());
                let copy = data[start..end.max(start)].to_vec();
                let to = at(*to, data.len());
                data.splice(to..to, copy);
            }
            Edit::InsertToken { at: i, token } => {
                let tokens = target.tokens();
                if !tokens.is_empty() {
                    let to = at(*i, data.len());
                    let token = &tokens[*token as usize % tokens.len()];
                    data.splice(to..to, token.iter().copied());
                }
            }
            Edit::InsertBytes { at: i, bytes } => {
                let to = at(*i, data.len());
                data.splice(to..to, bytes.iter().copied());
            }
            Edit::ReplaceNumber { from, number } => replace_number(&mut data, *from, *number),
            Edit::Truncate { at: i } => data.truncate(at(*i, data.len())),
            Edit::Splice { at: i, seed, from } => {
                let other = &seeds[*seed as usize % seeds.len()];
                data.truncate(at(*i, data.len()));
                data.extend_from_slice(&other[at(*from, other.len())..]);
            }
            Edit::LengthField { choice } => overwrite_length_field(&mut data, *choice),
            Edit::Restructure(picks) => {
                if let Some(changed) = target.restructure(&data, &mut picks.clone()) {
                    data = changed;
                }
            }
            Edit::FlipBit { .. } | Edit::SetByte { .. } => {}
        }
        data.truncate(MAX_INPUT);
        data
    }
}

/// Replaces the digits of the first number found from `from` on with another number.
fn replace_number(data: &mut Vec<u8>, from: u32, number: u8) {
    let from = from as usize % (data.len() + 1);
    let Some(start) = data[from..]
        .iter()
        .position(u8::is_ascii_digit)
        .map(|p| p + from)
    else {
        return;
    };
    let end = data[start..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+')))
        .map_or(data.len(), |p| p + start);
    let number = INTERESTING_NUMBERS[number as usize % INTERESTING_NUMBERS.len()];
    data.splice(start..end, number.bytes());
}

fn overwrite_length_field(data: &mut [u8], choice: u8) {
    if data.len() < 8 {
        return;
    }
    let truth = (data.len() - 8) as u64;
    let candidates = [
        0,
        truth,
        truth.wrapping_sub(1),
        truth + 1,
        truth.wrapping_sub(u64::from(choice % 64)),
        100_000_001,
        u64::MAX,
        u64::MAX - 7,
    ];
    let value = candidates[choice as usize % candidates.len()];
    data[..8].copy_from_slice(&value.to_le_bytes());
}
