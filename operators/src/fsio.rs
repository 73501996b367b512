//! Reading the files a user names (configs, arrays, tokenizers, norm stats, graphs, traces)
//! with a size limit per kind of file. A directory, device or FIFO is refused before it is
//! opened, and a file larger than its kind allows before a byte of it is read, so a wrong
//! path (`/dev/zero`, a 10 GB file) costs neither gigabytes of memory nor a hang.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crate::{Error, Result};

const MIB: u64 = 1 << 20;

/// The largest file of each kind that is read (bytes). Each limit is far above what a real
/// file of its kind holds; the comment says what that is.
pub mod limit {
    use super::MIB;

    /// A checkpoint's `config.json`: under 1 KiB.
    pub const CONFIG_JSON: u64 = MIB;
    /// One `.npy` array of an observation: three 224x224 cameras are 0.5 MB, and raw 1080p
    /// frames 6 MB each.
    pub const NPY: u64 = 1024 * MIB;
    /// openpi's `norm_stats.json`: a few KiB.
    pub const NORM_STATS_JSON: u64 = 16 * MIB;
    /// A Hugging Face `tokenizer.json`: PaliGemma's is 17 MB.
    pub const TOKENIZER_JSON: u64 = 256 * MIB;
    /// A SentencePiece `.model`: PaliGemma's `paligemma_tokenizer.model` is 4.2 MB.
    pub const SENTENCEPIECE_MODEL: u64 = 64 * MIB;
    /// The JSON header of `model.safetensors` (the file itself is memory-mapped, of any
    /// size): pi0's 800 tensors take 130 KiB.
    pub const SAFETENSORS_HEADER: u64 = 16 * MIB;
    /// A dora dataflow YAML: a few KiB.
    pub const GRAPH_YAML: u64 = 4 * MIB;
    /// A JSON-lines span file: 300 bytes a span, six spans a frame, so hours at 30 Hz.
    pub const TRACE_JSONL: u64 = 1024 * MIB;
    /// One observation in openpi's msgpack wire format (the server takes 16 MB by default).
    pub const OPENPI_MSGPACK: u64 = 256 * MIB;
    /// A camera image file (PNG or JPEG).
    pub const IMAGE: u64 = 256 * MIB;
    /// A compiled kernel in the CUDA kernel cache: about 1 MB.
    pub const CUBIN: u64 = 256 * MIB;
    /// The GEMM algorithm picks of one device kind: a line per shape, a few hundred shapes.
    pub const GEMM_PLANS: u64 = 16 * MIB;
}

/// An error about `path` that is not the operating system's (wrong file type, too large).
fn refuse(path: &Path, kind: io::ErrorKind, msg: String) -> Error {
    Error::io(path, io::Error::new(kind, msg))
}

/// `n` bytes for a message: exact below 1 MiB, in MiB above.
fn size_text(n: u64) -> String {
    if n < MIB {
        format!("{n} bytes")
    } else {
        format!("{:.1} MiB ({n} bytes)", n as f64 / MIB as f64)
    }
}

/// Opens `path` for reading after checking that it is a regular file of at most `max_bytes`;
/// returns the file and its length. `what` names the kind of file in errors ("config.json").
pub fn open_regular(path: &Path, max_bytes: u64, what: &str) -> Result<(File, u64)> {
    // Look before opening: opening a FIFO blocks until someone writes to it.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    check_type(path, &meta, what)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // The file opened may not be the one looked at (a rename in between): check it again.
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    check_type(path, &meta, what)?;
    let len = meta.len();
    if len > max_bytes {
        return Err(refuse(
            path,
            io::ErrorKind::InvalidData,
            format!(
                "the file is {}, more than the {} allowed for a {what} file",
                size_text(len),
                size_text(max_bytes)
            ),
        ));
    }
    Ok((file, len))
}

fn check_type(path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<()> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    let found = if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file (a device, FIFO or socket)"
    };
    Err(refuse(
        path,
        io::ErrorKind::InvalidInput,
        format!("is {found}; expected a {what} file"),
    ))
}

/// The whole of `path`, a regular file of at most `max_bytes` (see [`open_regular`]).
pub fn read_limited(path: &Path, max_bytes: u64, what: &str) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, max_bytes, what)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // A file that grows after the size check is still read only up to the limit.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(refuse(
            path,
            io::ErrorKind::InvalidData,
            format!(
                "the file grew past the {} allowed for a {what} file while it was read",
                size_text(max_bytes)
            ),
        ));
    }
    Ok(bytes)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_string_limited(path: &Path, max_bytes: u64, what: &str) -> Result<String> {
    let bytes = read_limited(path, max_bytes, what)?;
    String::from_utf8(bytes).map_err(|e| {
        refuse(
            path,
            io::ErrorKind::InvalidData,
            format!(
                "the {what} is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, b"{\"a\": 1}").unwrap();
        assert_eq!(read_limited(&p, 8, "test").unwrap(), b"{\"a\": 1}");
        assert_eq!(read_string_limited(&p, 100, "test").unwrap(), "{\"a\": 1}");
        let err = read_limited(&p, 7, "config.json").unwrap_err().to_string();
        assert!(
            err.contains(
                "a.json: the file is 8 bytes, more than the 7 bytes allowed for a config.json file"
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_directories_devices_and_large_files_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_limited(dir.path(), 1 << 20, "graph YAML")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is a directory; expected a graph YAML file"),
            "{err}"
        );
        #[cfg(unix)]
        {
            let t = std::time::Instant::now();
            let err = read_limited(Path::new("/dev/zero"), u64::MAX, ".npy array")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("/dev/zero: is not a regular file (a device, FIFO or socket)"),
                "{err}"
            );
            assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
            // Opening a FIFO for reading would block until a writer comes: refused unopened.
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap();
            assert!(made.success());
            let err = read_limited(&fifo, 1 << 20, "config.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not a regular file"), "{err}");
        }
        // A sparse 10 GiB file: refused from its size, without reading it.
        let big = dir.path().join("big.npy");
        let f = File::create(&big).unwrap();
        f.set_len(10 << 30).unwrap();
        let t = std::time::Instant::now();
        let err = read_limited(&big, limit::NPY, ".npy array")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the file is 10240.0 MiB (10737418240 bytes), more than the 1024.0 MiB"),
            "{err}"
        );
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
        let err = read_limited(&dir.path().join("absent"), 10, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent"), "{err}");
    }

    #[test]
    fn names_invalid_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        std::fs::write(&p, b"ab\xffc").unwrap();
        let err = read_string_limited(&p, 100, "tokenizer.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.json: the tokenizer.json is not UTF-8 text (invalid byte at offset 2)"),
            "{err}"
        );
    }
}
