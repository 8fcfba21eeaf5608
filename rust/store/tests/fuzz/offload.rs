//! The `offload_index` target: an accelerate offload folder's `index.json`, over two real
//! `.dat` files, mounted and served.

use std::fs;

use bigmodel_store::mount::mount_offload_folder;

use super::index::json_tokens;
use super::serve::serve_and_check;
use super::{scratch_dir, Outcome, Picks, Target};

/// An accelerate offload folder's `index.json`, over two real `.dat` files.
pub struct OffloadTarget {
    dir: tempfile::TempDir,
    seeds: Vec<Vec<u8>>,
    tokens: Vec<Vec<u8>>,
}

impl OffloadTarget {
    pub fn new() -> OffloadTarget {
        let dir = scratch_dir();
        fs::write(dir.path().join("w.dat"), [7u8; 64]).expect("fixture");
        fs::write(dir.path().join("b.dat"), [9u8; 16]).expect("fixture");
        let seeds = vec![
            br#"{"w": {"dtype": "float32", "shape": [4, 4]}, "b": {"dtype": "float32", "shape": [4]}}"#.to_vec(),
            br#"{"w": {"dtype": "int64", "shape": [8]}, "b": {"dtype": "bool", "shape": [2, 8]}}"#.to_vec(),
        ];
        let names = [b"\"w\"".to_vec(), b"\"b\"".to_vec(), b"\"../w\"".to_vec()];
        OffloadTarget {
            dir,
            seeds,
            tokens: json_tokens(&names),
        }
    }
}

impl Target for OffloadTarget {
    fn seeds(&self) -> &[Vec<u8>] {
        &self.seeds
    }

    fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    fn restructure(&self, _seed: &[u8], picks: &mut Picks) -> Option<Vec<u8>> {
        // A new document (the seed aside): mostly sizes that match the `.dat` files (64 and
        // 16 bytes), some that do not.
        const INFOS: &[(&str, &str)] = &[
            ("float32", "[16]"),
            ("float32", "[4, 4]"),
            ("int8", "[64]"),
            ("bool", "[8, 8]"),
            ("float64", "[2]"),
            ("bfloat16", "[8]"),
            ("float16", "[2, 2, 2]"),
            ("uint8", "[16]"),
            ("int64", "[]"),
            ("float32", "[17]"),
            ("complex64", "[8]"),
        ];
        const NAMES: &[&str] = &["w", "b", "x", "../w", "w/b", ""];
        let entries: Vec<String> = (0..=picks.below(3))
            .map(|_| {
                let (dtype, shape) = INFOS[picks.below(INFOS.len())];
                let name = NAMES[picks.below(NAMES.len())];
                format!(r#""{name}": {{"dtype": "{dtype}", "shape": {shape}}}"#)
            })
            .collect();
        Some(format!("{{{}}}", entries.join(", ")).into_bytes())
    }

    fn run(&self, input: &[u8]) -> Result<Outcome, String> {
        fs::write(self.dir.path().join("index.json"), input).map_err(|e| e.to_string())?;
        let Ok(index) = mount_offload_folder(self.dir.path()) else {
            return Ok(Outcome::Refused);
        };
        serve_and_check(&index, self.dir.path(), input.len() % 2 == 0)
    }
}
