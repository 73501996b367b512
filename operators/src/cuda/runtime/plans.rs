//! GEMM algorithm choices shared by every cuBLASLt handle of a process and remembered across
//! processes. The autotuner's pick for a shape depends on timing noise, and different picks
//! sum in different orders; sharing the picks makes every stage process of a split graph,
//! and the fused policy, run each shape with the same algorithm — so they give the same
//! actions bit for bit. Picks live in memory for the process and are appended to a file in
//! the kernel cache (one line per shape, the first line of a shape wins), so the first run on
//! a machine decides for the ones after it.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// An algorithm as cuBLASLt stores it: 8 opaque 64-bit words.
pub type Algo = [u64; 8];

/// The shapes' picks of one device kind.
struct Book {
    picks: HashMap<String, Algo>,
    file: Option<PathBuf>,
}

fn books() -> &'static Mutex<HashMap<String, Book>> {
    static BOOKS: OnceLock<Mutex<HashMap<String, Book>>> = OnceLock::new();
    BOOKS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The file of `device`'s picks under the kernel cache (None when the cache is off).
fn file_of(device: &str) -> Option<PathBuf> {
    let dir = crate::settings::kernel_cache().ok().flatten()?;
    let name: String = device
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Some(dir.join(format!("gemm-plans-{name}.txt")))
}

/// Parses lines `key<TAB>w0 w1 ... w7` (hex words); other lines are skipped.
fn parse(text: &str) -> HashMap<String, Algo> {
    let mut picks = HashMap::new();
    for line in text.lines() {
        let Some((key, words)) = line.split_once('\t') else {
            continue;
        };
        let words: Vec<u64> = words
            .split_whitespace()
            .filter_map(|w| u64::from_str_radix(w, 16).ok())
            .collect();
        if let Ok(algo) = <Algo>::try_from(words) {
            picks.entry(key.to_string()).or_insert(algo);
        }
    }
    picks
}

fn line(key: &str, algo: &Algo) -> String {
    let words: Vec<String> = algo.iter().map(|w| format!("{w:x}")).collect();
    format!("{key}\t{}\n", words.join(" "))
}

impl Book {
    /// The picks in `file` (none when it is absent or unreadable).
    fn load(file: Option<PathBuf>) -> Book {
        let picks = file
            .as_ref()
            .and_then(|p| {
                crate::fsio::read_string_limited(p, crate::fsio::limit::GEMM_PLANS, "GEMM plans")
                    .ok()
            })
            .map(|t| parse(&t))
            .unwrap_or_default();
        Book { picks, file }
    }

    fn get(&self, key: &str) -> Option<Algo> {
        self.picks.get(key).copied()
    }

    /// Records `algo` for `key` unless a pick exists (appending it to the file); returns
    /// the pick that holds.
    fn put(&mut self, key: &str, algo: Algo) -> Algo {
        if let Some(held) = self.picks.get(key) {
            return *held;
        }
        self.picks.insert(key.to_string(), algo);
        // Best effort: a pick that cannot be written is only re-tuned by the next process.
        if let Some(path) = &self.file {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                // One write of one short line: appends of concurrent processes do not mix.
                let _ = f.write_all(line(key, &algo).as_bytes());
            }
        }
        algo
    }
}

fn with_book<T>(device: &str, f: impl FnOnce(&mut Book) -> T) -> Option<T> {
    let mut books = books().lock().ok()?;
    let book = books
        .entry(device.to_string())
        .or_insert_with(|| Book::load(file_of(device)));
    Some(f(book))
}

/// The algorithm picked for `key` on `device` (by this process or an earlier one).
pub fn get(device: &str, key: &str) -> Option<Algo> {
    with_book(device, |b| b.get(key)).flatten()
}

/// Records `algo` for `key` on `device` unless a pick exists; returns the pick that holds.
pub fn put(device: &str, key: &str, algo: Algo) -> Algo {
    with_book(device, |b| b.put(key, algo)).unwrap_or(algo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_the_first_pick_of_a_shape_wins() {
        let a: Algo = [1, 2, 3, 0xdead_beef, 5, 6, 7, u64::MAX];
        let b: Algo = [9; 8];
        let text = format!(
            "{}{}not a line\nk2\t1 2 3\n{}",
            line("k1", &a),
            line("k1", &b),
            line("k2", &b)
        );
        let picks = parse(&text);
        assert_eq!(picks.get("k1"), Some(&a));
        assert_eq!(picks.get("k2"), Some(&b), "a short line is skipped");
        assert_eq!(picks.len(), 2);
    }

    #[test]
    fn picks_persist_and_the_first_one_holds_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("gemm-plans-x.txt");
        let mut first = Book::load(Some(file.clone()));
        assert_eq!(first.get("shape"), None);
        assert_eq!(first.put("shape", [1; 8]), [1; 8]);
        assert_eq!(
            first.put("shape", [2; 8]),
            [1; 8],
            "a process keeps its pick"
        );
        // A second process starting before the first wrote picks its own, appended after.
        let mut racing = Book::load(None);
        racing.file = Some(file.clone());
        racing.put("shape", [3; 8]);
        // A later process reads the first pick.
        let later = Book::load(Some(file.clone()));
        assert_eq!(later.get("shape"), Some([1; 8]));
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
