//! NumPy `.npy` files, the format of an observation directory. Reads format versions 1.0, 2.0
//! and 3.0 and writes 1.0; little-endian, C order. Every error names the file and what was
//! expected and found, and no input makes the reader panic.

use std::fmt;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fsio;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The element types an observation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    U8,
    Bool,
    I32,
    I64,
    F32,
    F64,
}

impl DType {
    /// The `descr` string numpy writes for this type.
    fn descr(self) -> &'static str {
        match self {
            DType::U8 => "|u1",
            DType::Bool => "|b1",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::F32 => "<f4",
            DType::F64 => "<f8",
        }
    }

    fn size(self) -> usize {
        match self {
            DType::U8 | DType::Bool => 1,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::U8 => "uint8",
            DType::Bool => "bool",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F32 => "float32",
            DType::F64 => "float64",
        })
    }
}

/// An n-dimensional array in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct Array<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

/// Reads a `uint8` array.
pub fn read_u8(path: &Path) -> Result<Array<u8>> {
    let raw = read_raw(path, &[DType::U8])?;
    Ok(Array {
        shape: raw.shape,
        data: raw.data,
    })
}

/// Reads a `bool` array; a byte other than 0 or 1 is an error.
pub fn read_bool(path: &Path) -> Result<Array<bool>> {
    let raw = read_raw(path, &[DType::Bool])?;
    let mut data = Vec::with_capacity(raw.data.len());
    for (i, &b) in raw.data.iter().enumerate() {
        match b {
            0 => data.push(false),
            1 => data.push(true),
            _ => {
                return Err(Error::Array {
                    path: path.into(),
                    expected: "bool elements stored as byte 0 or 1".into(),
                    found: format!("byte {b} at element {i}"),
                })
            }
        }
    }
    Ok(Array {
        shape: raw.shape,
        data,
    })
}

/// Reads an `int32` array. `int64` (numpy's default integer) is accepted too when every value
/// fits in an `i32`.
pub fn read_i32(path: &Path) -> Result<Array<i32>> {
    let raw = read_raw(path, &[DType::I32, DType::I64])?;
    let data = match raw.dtype {
        DType::I64 => {
            let mut data = Vec::with_capacity(raw.data.len() / 8);
            for (i, bytes) in le_chunks::<8>(&raw.data).enumerate() {
                let v = i64::from_le_bytes(bytes);
                let v = i32::try_from(v).map_err(|_| Error::Array {
                    path: path.into(),
                    expected: "int64 values within the int32 range".into(),
                    found: format!("{v} at element {i}"),
                })?;
                data.push(v);
            }
            data
        }
        _ => le_chunks::<4>(&raw.data).map(i32::from_le_bytes).collect(),
    };
    Ok(Array {
        shape: raw.shape,
        data,
    })
}

/// Reads a `float32` array.
pub fn read_f32(path: &Path) -> Result<Array<f32>> {
    let raw = read_raw(path, &[DType::F32])?;
    Ok(Array {
        shape: raw.shape,
        data: le_chunks::<4>(&raw.data).map(f32::from_le_bytes).collect(),
    })
}

/// Writes a `float32` array (format 1.0).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write_raw(path, DType::F32, shape, data.len(), |out| {
        data.iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
    })
}

/// Reads a `float64` array.
pub fn read_f64(path: &Path) -> Result<Array<f64>> {
    let raw = read_raw(path, &[DType::F64])?;
    Ok(Array {
        shape: raw.shape,
        data: le_chunks::<8>(&raw.data).map(f64::from_le_bytes).collect(),
    })
}

/// Writes a `float64` array (format 1.0).
pub fn write_f64(path: &Path, shape: &[usize], data: &[f64]) -> Result<()> {
    write_raw(path, DType::F64, shape, data.len(), |out| {
        data.iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
    })
}

/// Writes a `uint8` array (format 1.0).
pub fn write_u8(path: &Path, shape: &[usize], data: &[u8]) -> Result<()> {
    write_raw(path, DType::U8, shape, data.len(), |out| {
        out.extend_from_slice(data)
    })
}

/// Writes a `bool` array (format 1.0).
pub fn write_bool(path: &Path, shape: &[usize], data: &[bool]) -> Result<()> {
    write_raw(path, DType::Bool, shape, data.len(), |out| {
        out.extend(data.iter().map(|&b| u8::from(b)))
    })
}

/// Writes an `int32` array (format 1.0).
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> Result<()> {
    write_raw(path, DType::I32, shape, data.len(), |out| {
        data.iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
    })
}

/// Fixed-size little-endian words of `bytes`; a trailing partial word is dropped, which
/// `read_raw` rules out by checking the data length.
fn le_chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| {
        let mut word = [0u8; N];
        word.copy_from_slice(c);
        word
    })
}

/// A file's array with its data bytes still encoded.
struct Raw {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The longest header read (bytes). Format 1.0 headers cannot exceed 65535 bytes, and numpy
/// itself refuses headers over 10000 bytes unless told otherwise.
const MAX_HEADER_BYTES: usize = 65536;

/// The deepest nesting of tuples and lists in a header: a shape is a tuple inside the dict,
/// a structured dtype a few lists deep. Bounded so that no header can exhaust the stack.
const MAX_NESTING: usize = 16;

/// Up to `n` bytes from the reader's position (fewer at the end of the file).
fn read_up_to(file: &mut std::fs::File, n: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    file.take(n as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// Reads the preamble and header first and the data only when the file's length matches the
/// header's shape, so a damaged file is refused without reading its bulk.
fn read_raw(path: &Path, accepted: &[DType]) -> Result<Raw> {
    let npy_err = |reason: String| Error::Npy {
        path: path.into(),
        reason,
    };
    let io_err = |e| Error::io(path, e);
    let (mut file, file_len) = fsio::open_regular(path, fsio::limit::NPY, ".npy array")?;
    let preamble = read_up_to(&mut file, 8).map_err(io_err)?;
    if preamble.len() < 8 || &preamble[..6] != MAGIC {
        return Err(npy_err("missing the \\x93NUMPY magic string".into()));
    }
    let (major, minor) = (preamble[6], preamble[7]);
    let (len_bytes, utf8) = match (major, minor) {
        (1, 0) => (2, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        _ => {
            return Err(npy_err(format!(
                "unsupported format version {major}.{minor} (expected 1.0, 2.0 or 3.0)"
            )))
        }
    };
    let header_start = 8 + len_bytes;
    let header_len = match read_up_to(&mut file, len_bytes).map_err(io_err)?[..] {
        [a, b] => usize::from(u16::from_le_bytes([a, b])),
        [a, b, c, d] => u32::from_le_bytes([a, b, c, d]) as usize,
        _ => {
            return Err(npy_err(
                "truncated: the file ends inside the preamble".into(),
            ))
        }
    };
    // The file's length is known: every size below is checked against it before reading.
    let file_len = usize::try_from(file_len).unwrap_or(usize::MAX);
    let after_preamble = file_len.saturating_sub(header_start);
    if header_len > after_preamble {
        return Err(npy_err(format!(
            "truncated: the header is {header_len} bytes but the file has only {after_preamble} after the preamble"
        )));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(npy_err(format!(
            "the header is {header_len} bytes, more than the {MAX_HEADER_BYTES} this reader accepts"
        )));
    }
    let data_start = header_start + header_len;
    let header_bytes = read_up_to(&mut file, header_len).map_err(io_err)?;
    if header_bytes.len() != header_len {
        return Err(npy_err("the file shrank while it was read".into()));
    }
    let text = if utf8 {
        String::from_utf8(header_bytes)
            .map_err(|_| npy_err("the format 3.0 header is not valid UTF-8".into()))?
    } else {
        // Formats 1.0 and 2.0 store the header in latin-1: every byte is one char.
        header_bytes.iter().map(|&b| char::from(b)).collect()
    };
    let header = Header::parse(&text).map_err(|reason| npy_err(format!("header: {reason}")))?;

    let expected = || {
        let names: Vec<String> = accepted.iter().map(|d| d.to_string()).collect();
        format!("dtype {}", names.join(" or "))
    };
    let dtype = match parse_descr(&header.descr) {
        Ok(dtype) if accepted.contains(&dtype) => dtype,
        Ok(dtype) => {
            return Err(Error::Array {
                path: path.into(),
                expected: expected(),
                found: dtype.to_string(),
            })
        }
        Err(found) => {
            return Err(Error::Array {
                path: path.into(),
                expected: expected(),
                found,
            })
        }
    };
    if header.fortran_order {
        return Err(Error::Array {
            path: path.into(),
            expected: "C order (fortran_order False)".into(),
            found: "fortran_order True; save np.ascontiguousarray(a) instead".into(),
        });
    }

    let shape_text = format!("{:?}", header.shape);
    let nbytes = header
        .shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| npy_err(format!("shape {shape_text} is too large to address")))?;
    let found = file_len - data_start;
    if found < nbytes {
        return Err(npy_err(format!(
            "truncated: shape {shape_text} of {dtype} needs {nbytes} data bytes, found {found}"
        )));
    }
    if found > nbytes {
        return Err(npy_err(format!(
            "shape {shape_text} of {dtype} needs {nbytes} data bytes, found {found} \
             ({} unexpected trailing bytes)",
            found - nbytes
        )));
    }
    let mut data = vec![0u8; nbytes];
    file.read_exact(&mut data).map_err(|e| {
        npy_err(format!(
            "the file changed while it was read (reading {nbytes} data bytes: {e})"
        ))
    })?;
    if file.read(&mut [0u8; 1]).map_err(io_err)? != 0 {
        return Err(npy_err("the file grew while it was read".into()));
    }
    Ok(Raw {
        dtype,
        shape: header.shape,
        data,
    })
}

fn write_raw(
    path: &Path,
    dtype: DType,
    shape: &[usize],
    len: usize,
    encode: impl FnOnce(&mut Vec<u8>),
) -> Result<()> {
    let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if numel != Some(len) {
        return Err(Error::Array {
            path: path.into(),
            expected: format!(
                "{} elements for shape {shape:?}",
                numel.map_or_else(|| "an unaddressable number of".into(), |n| n.to_string())
            ),
            found: format!("{len} elements"),
        });
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims.join("")),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}",
        dtype.descr()
    );
    // numpy pads the header with spaces and a newline so the data starts 64-byte aligned.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.extend(std::iter::repeat_n(
        ' ',
        unpadded.next_multiple_of(64) - unpadded,
    ));
    header.push('\n');
    let header_len = u16::try_from(header.len()).map_err(|_| Error::Npy {
        path: path.into(),
        reason: format!(
            "a {}-dimensional shape needs a {}-byte header, more than format 1.0 allows",
            shape.len(),
            header.len()
        ),
    })?;

    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + len * dtype.size());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    encode(&mut out);
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

/// A numpy type string (`dtype.str`: `<f4`, `|u1`, `>i8`, `<U5`) split into its parts. The
/// one parser of them: the `.npy` reader and the openpi message reader
/// ([`crate::openpi::ndarray`]) each map it onto the types they take, with their own errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeStr {
    /// The byte-order character (`<`, `>`, `|` or `=`), when the string starts with one.
    pub order: Option<char>,
    /// The kind character: `b`, `i`, `u`, `f`, `c`, `U`, `S`, ...
    pub kind: char,
    /// The number after the kind: bytes per element (characters for `U`).
    pub count: usize,
}

impl TypeStr {
    /// `None` when `s` is not an (optional) byte order, a kind character and a number.
    pub fn parse(s: &str) -> Option<TypeStr> {
        let mut chars = s.chars();
        let first = chars.next()?;
        let (order, rest) = match first {
            '<' | '>' | '|' | '=' => (Some(first), chars.as_str()),
            _ => (None, s),
        };
        let mut chars = rest.chars();
        let kind = chars.next()?;
        let count = chars.as_str().parse().ok()?;
        Some(TypeStr { order, kind, count })
    }

    /// Whether multi-byte elements are big-endian (`>`; `=` is taken as little-endian, the
    /// native order of every machine this runs on).
    pub fn big_endian(&self) -> bool {
        self.order == Some('>')
    }
}

/// The dtype named by a `descr` string, or a description of what was found instead.
fn parse_descr(descr: &str) -> std::result::Result<DType, String> {
    let Some(TypeStr {
        order: Some(order),
        kind,
        count: size,
    }) = TypeStr::parse(descr)
    else {
        return Err(format!("unrecognised descr '{descr}'"));
    };
    // A size from the file may be any number: the bit count is checked.
    let name = match (kind, size.checked_mul(8)) {
        ('b', _) if size == 1 => "bool".to_string(),
        ('i', Some(bits)) => format!("int{bits}"),
        ('u', Some(bits)) => format!("uint{bits}"),
        ('f', Some(bits)) => format!("float{bits}"),
        ('c', Some(bits)) => format!("complex{bits}"),
        _ => format!("'{descr}'"),
    };
    let dtype = match (kind, size) {
        ('b', 1) => DType::Bool,
        ('u', 1) => DType::U8,
        ('i', 4) => DType::I32,
        ('i', 8) => DType::I64,
        ('f', 4) => DType::F32,
        ('f', 8) => DType::F64,
        _ => return Err(format!("{name} ('{descr}')")),
    };
    match order {
        '<' | '|' => Ok(dtype),
        _ if size == 1 && matches!(order, '>' | '=') => Ok(dtype),
        '>' => Err(format!("big-endian {name} ('{descr}')")),
        _ => Err(format!("{name} of byte order '{order}' ('{descr}')")),
    }
}

/// The header dict: `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A Python literal of the kinds a header holds.
#[derive(Debug)]
enum Value {
    Str(String),
    Bool(bool),
    Int(u64),
    None,
    Tuple(Vec<Value>),
    List(#[allow(dead_code)] Vec<Value>),
}

impl Header {
    fn parse(text: &str) -> std::result::Result<Header, String> {
        let mut p = Parser {
            chars: text.chars().collect(),
            pos: 0,
            depth: 0,
        };
        let entries = p.dict()?;
        p.skip_ws();
        if p.pos < p.chars.len() {
            return Err(format!(
                "unexpected text after the dict: {:?}",
                p.chars[p.pos..].iter().take(20).collect::<String>()
            ));
        }
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        for (key, value) in entries {
            let slot_taken = match key.as_str() {
                "descr" => descr.replace(value).is_some(),
                "fortran_order" => fortran_order.replace(value).is_some(),
                "shape" => shape.replace(value).is_some(),
                _ => return Err(format!("unexpected key '{key}'")),
            };
            if slot_taken {
                return Err(format!("key '{key}' appears twice"));
            }
        }
        let descr = match descr {
            Some(Value::Str(s)) => s,
            Some(Value::List(_)) => return Err("structured dtypes are not supported".into()),
            Some(v) => return Err(format!("'descr' is {v:?}, expected a string")),
            None => return Err("missing key 'descr'".into()),
        };
        let fortran_order = match fortran_order {
            Some(Value::Bool(b)) => b,
            Some(v) => return Err(format!("'fortran_order' is {v:?}, expected True or False")),
            None => return Err("missing key 'fortran_order'".into()),
        };
        let shape = match shape {
            Some(Value::Tuple(dims)) => {
                dims.iter()
                    .map(|d| match d {
                        Value::Int(n) => usize::try_from(*n)
                            .map_err(|_| format!("shape dimension {n} is too large")),
                        v => Err(format!("shape holds {v:?}, expected integers")),
                    })
                    .collect::<std::result::Result<Vec<usize>, String>>()?
            }
            Some(v) => return Err(format!("'shape' is {v:?}, expected a tuple")),
            None => return Err("missing key 'shape'".into()),
        };
        Ok(Header {
            descr,
            fortran_order,
            shape,
        })
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    /// Tuples and lists open at `pos` (at most [`MAX_NESTING`]).
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn consume(&mut self, c: char) -> std::result::Result<(), String> {
        self.skip_ws();
        match self.peek() {
            Some(found) if found == c => {
                self.pos += 1;
                Ok(())
            }
            Some(found) => Err(format!(
                "expected '{c}' at offset {}, found '{found}'",
                self.pos
            )),
            None => Err(format!("expected '{c}', found the end of the header")),
        }
    }

    fn dict(&mut self) -> std::result::Result<Vec<(String, Value)>, String> {
        self.consume('{')?;
        let mut entries = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() == Some('}') {
                self.pos += 1;
                return Ok(entries);
            }
            let key = match self.value()? {
                Value::Str(s) => s,
                v => return Err(format!("dict key {v:?} is not a string")),
            };
            self.consume(':')?;
            let value = self.value()?;
            entries.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {}
                Some(c) => {
                    return Err(format!(
                        "expected ',' or '}}' at offset {}, found '{c}'",
                        self.pos
                    ))
                }
                None => return Err("the dict is not closed".into()),
            }
        }
    }

    /// A tuple or list; `(3,)` and `()` are tuples, trailing commas are allowed. Recurses
    /// through [`Parser::value`], at most [`MAX_NESTING`] deep.
    fn sequence(&mut self, close: char) -> std::result::Result<Vec<Value>, String> {
        if self.depth >= MAX_NESTING {
            return Err(format!(
                "tuples and lists nested more than {MAX_NESTING} deep at offset {}",
                self.pos.saturating_sub(1)
            ));
        }
        self.depth += 1;
        let items = self.sequence_items(close);
        self.depth -= 1;
        items
    }

    fn sequence_items(&mut self, close: char) -> std::result::Result<Vec<Value>, String> {
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(c) if c == close => {
                    self.pos += 1;
                    return Ok(items);
                }
                None => return Err(format!("missing '{close}'")),
                _ => {}
            }
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(c) if c == close => {}
                Some(c) => {
                    return Err(format!(
                        "expected ',' or '{close}' at offset {}, found '{c}'",
                        self.pos
                    ))
                }
                None => return Err(format!("missing '{close}'")),
            }
        }
    }

    fn value(&mut self) -> std::result::Result<Value, String> {
        self.skip_ws();
        let start = self.pos;
        match self.peek() {
            Some(q @ ('\'' | '"')) => {
                self.pos += 1;
                let mut s = String::new();
                loop {
                    match self.peek() {
                        Some(c) if c == q => {
                            self.pos += 1;
                            return Ok(Value::Str(s));
                        }
                        Some('\\') => {
                            self.pos += 1;
                            match self.peek() {
                                Some(c) => s.push(c),
                                None => return Err("unterminated string".into()),
                            }
                            self.pos += 1;
                        }
                        Some(c) => {
                            s.push(c);
                            self.pos += 1;
                        }
                        None => return Err("unterminated string".into()),
                    }
                }
            }
            Some('(') => {
                self.pos += 1;
                Ok(Value::Tuple(self.sequence(')')?))
            }
            Some('[') => {
                self.pos += 1;
                Ok(Value::List(self.sequence(']')?))
            }
            Some(c) if c.is_ascii_digit() => {
                let mut n: u64 = 0;
                while let Some(d) = self.peek().and_then(|c| c.to_digit(10)) {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(d)))
                        .ok_or_else(|| format!("integer at offset {start} is too large"))?;
                    self.pos += 1;
                }
                // Python 2 era files write long integers as `3L`.
                if self.peek() == Some('L') {
                    self.pos += 1;
                }
                Ok(Value::Int(n))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    self.pos += 1;
                }
                let word: String = self.chars[start..self.pos].iter().collect();
                match word.as_str() {
                    "True" => Ok(Value::Bool(true)),
                    "False" => Ok(Value::Bool(false)),
                    "None" => Ok(Value::None),
                    _ => Err(format!("unexpected name '{word}' at offset {start}")),
                }
            }
            Some(c) => Err(format!("unexpected '{c}' at offset {start}")),
            None => Err("unexpected end of the header".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/npy")
            .join(name)
    }

    /// A .npy file with the given header text (padded like numpy's) and data bytes.
    fn npy_bytes(version: (u8, u8), header: &str, data: &[u8]) -> Vec<u8> {
        let len_bytes = if version.0 == 1 { 2 } else { 4 };
        let mut header = header.to_string();
        let unpadded = 8 + len_bytes + header.len() + 1;
        header.extend(std::iter::repeat_n(
            ' ',
            unpadded.next_multiple_of(64) - unpadded,
        ));
        header.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version.0, version.1]);
        if len_bytes == 2 {
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn write_tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn round_trips_every_type() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.npy");
        let f = [0.5f32, -1.25, f32::MAX, f32::MIN_POSITIVE, -0.0, 3.0];
        write_f32(&p, &[2, 3], &f).unwrap();
        let a = read_f32(&p).unwrap();
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(
            a.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            f.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );

        let d = [0.1f64, -2.5e300, f64::MIN_POSITIVE, -0.0];
        write_f64(&p, &[2, 2], &d).unwrap();
        let a = read_f64(&p).unwrap();
        assert_eq!(a.shape, [2, 2]);
        assert_eq!(
            a.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(read_f32(&p).is_err(), "float64 is not read as float32");

        let u: Vec<u8> = (0..=255).collect();
        write_u8(&p, &[4, 8, 8], &u).unwrap();
        assert_eq!(
            read_u8(&p).unwrap(),
            Array {
                shape: vec![4, 8, 8],
                data: u
            }
        );

        let b = [true, false, false, true, true];
        write_bool(&p, &[5], &b).unwrap();
        assert_eq!(
            read_bool(&p).unwrap(),
            Array {
                shape: vec![5],
                data: b.to_vec()
            }
        );

        let i = [i32::MIN, -1, 0, 7, i32::MAX, 2];
        write_i32(&p, &[3, 1, 2], &i).unwrap();
        assert_eq!(
            read_i32(&p).unwrap(),
            Array {
                shape: vec![3, 1, 2],
                data: i.to_vec()
            }
        );

        write_f32(&p, &[], &[42.0]).unwrap();
        assert_eq!(
            read_f32(&p).unwrap(),
            Array {
                shape: vec![],
                data: vec![42.0]
            }
        );

        write_f32(&p, &[0, 3], &[]).unwrap();
        assert_eq!(
            read_f32(&p).unwrap(),
            Array {
                shape: vec![0, 3],
                data: vec![]
            }
        );
    }

    #[test]
    fn writes_numpy_headers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.npy");
        write_f32(&p, &[3], &[1.0, 2.0, 3.0]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"));
        assert!(header.ends_with(" \n"));
        assert_eq!(bytes.len(), 10 + header_len + 12);

        write_u8(&p, &[], &[1]).unwrap();
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        assert!(
            text.contains("'descr': '|u1'") && text.contains("'shape': ()"),
            "{text}"
        );
        write_bool(&p, &[1, 2], &[true, false]).unwrap();
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        assert!(
            text.contains("'descr': '|b1'") && text.contains("'shape': (1, 2)"),
            "{text}"
        );
    }

    #[test]
    fn write_rejects_a_shape_that_does_not_match_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npy");
        let err = write_f32(&p, &[2, 3], &[0.0; 5]).unwrap_err().to_string();
        assert!(
            err.contains("expected 6 elements for shape [2, 3], found 5 elements"),
            "{err}"
        );
        let err = write_u8(&p, &[usize::MAX, 2], &[]).unwrap_err().to_string();
        assert!(err.contains("unaddressable"), "{err}");
        assert!(!p.exists());
    }

    #[test]
    fn parses_header_variants() {
        let parse = |s: &str| Header::parse(s);
        let h = parse("{'descr':'<f4','fortran_order':False,'shape':(2,3)}").unwrap();
        assert_eq!(h.shape, [2, 3]);
        let h =
            parse("  {\"descr\" : \"|u1\" ,\n 'shape' : ( 4 , ) , 'fortran_order' : True , }  \n")
                .unwrap();
        assert_eq!(
            h,
            Header {
                descr: "|u1".into(),
                fortran_order: true,
                shape: vec![4]
            }
        );
        assert_eq!(
            parse("{'descr': '<f4', 'fortran_order': False, 'shape': (), }")
                .unwrap()
                .shape,
            Vec::<usize>::new()
        );
        assert_eq!(
            parse("{'descr': '<f4', 'fortran_order': False, 'shape': (3L, 4L), }")
                .unwrap()
                .shape,
            [3, 4]
        );

        for (text, msg) in [
            (
                "{'descr': '<f4', 'fortran_order': False}",
                "missing key 'shape'",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
                "unexpected key 'x'",
            ),
            (
                "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': ()}",
                "twice",
            ),
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': ()}",
                "structured",
            ),
            (
                "{'descr': '<f4', 'fortran_order': 0, 'shape': ()}",
                "expected True or False",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': [2]}",
                "expected a tuple",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}",
                "unexpected '-'",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
                "too large",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x",
                "after the dict",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,",
                "missing ')'",
            ),
            ("{'descr': '<f4", "unterminated string"),
            ("", "found the end of the header"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(msg), "{text:?}: {err}");
        }
    }

    #[test]
    fn names_expected_and_found_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("images.npy");
        write_f32(&p, &[1], &[0.0]).unwrap();
        let err = read_u8(&p).unwrap_err().to_string();
        assert!(
            err.ends_with("images.npy: expected dtype uint8, found float32"),
            "{err}"
        );
        let err = read_i32(&p).unwrap_err().to_string();
        assert!(
            err.ends_with("expected dtype int32 or int64, found float32"),
            "{err}"
        );

        for (descr, found) in [
            ("<i2", "int16 ('<i2')"),
            ("<f2", "float16 ('<f2')"),
            (">f4", "big-endian float32 ('>f4')"),
            ("=f4", "float32 of byte order '='"),
            ("<U3", "'<U3'"),
            ("|O", "unrecognised descr '|O'"),
        ] {
            assert_eq!(
                parse_descr(descr).map_err(|f| f.contains(found)),
                Err(true),
                "{descr}"
            );
        }
        assert_eq!(parse_descr(">u1"), Ok(DType::U8));
        assert_eq!(parse_descr("|b1"), Ok(DType::Bool));
        assert_eq!(DType::F64.to_string(), "float64");
        assert_eq!(DType::Bool.to_string(), "bool");
    }

    /// One parser splits numpy type strings for both readers: the `.npy` reader and the
    /// openpi message reader agree on every string either accepts.
    #[test]
    fn type_strings_are_split_once_for_both_readers() {
        let t = |order, kind, count| Some(TypeStr { order, kind, count });
        assert_eq!(TypeStr::parse("<f4"), t(Some('<'), 'f', 4));
        assert_eq!(TypeStr::parse("|u1"), t(Some('|'), 'u', 1));
        assert_eq!(TypeStr::parse(">i8"), t(Some('>'), 'i', 8));
        assert_eq!(TypeStr::parse("=U12"), t(Some('='), 'U', 12));
        assert_eq!(TypeStr::parse("f8"), t(None, 'f', 8));
        for bad in ["", "<", "|O", "<f", "<fx", "x"] {
            assert_eq!(TypeStr::parse(bad), None, "{bad}");
        }
        assert!(TypeStr::parse(">f4").unwrap().big_endian());
        assert!(!TypeStr::parse("=f4").unwrap().big_endian());
        use crate::openpi::ndarray;
        for s in [
            "<f4", "<f8", "|u1", "<u1", ">u1", "=u1", "|b1", "<i4", "<i8", ">f4", "=f4", "<f2",
            "<i2", "f4", "<U3", "|O", "<c8",
        ] {
            if let Ok(d) = parse_descr(s) {
                let m = ndarray::DType::parse(s).unwrap_or_else(|| panic!("{s}"));
                assert_eq!(m.size, d.size(), "{s}");
                assert!(!m.big_endian || d.size() == 1, "{s}");
            }
        }
    }

    #[test]
    fn reads_int64_into_i32_with_a_range_check() {
        let dir = tempfile::tempdir().unwrap();
        let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }";
        let data: Vec<u8> = [5i64, -7, i64::from(i32::MIN)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = write_tmp(&dir, "tokens.npy", &npy_bytes((1, 0), header, &data));
        assert_eq!(read_i32(&p).unwrap().data, [5, -7, i32::MIN]);

        let data: Vec<u8> = [1i64, 1 << 31]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = write_tmp(
            &dir,
            "tokens.npy",
            &npy_bytes(
                (1, 0),
                "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }",
                &data,
            ),
        );
        let err = read_i32(&p).unwrap_err().to_string();
        assert!(
            err.contains(
                "expected int64 values within the int32 range, found 2147483648 at element 1"
            ),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_bool_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let header = "{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }";
        let p = write_tmp(&dir, "mask.npy", &npy_bytes((1, 0), header, &[1, 0, 2]));
        let err = read_bool(&p).unwrap_err().to_string();
        assert!(err.contains("found byte 2 at element 2"), "{err}");
    }

    #[test]
    fn reads_versions_2_and_3() {
        let dir = tempfile::tempdir().unwrap();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        let data: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        for version in [(2, 0), (3, 0)] {
            let p = write_tmp(&dir, "v.npy", &npy_bytes(version, header, &data));
            assert_eq!(read_f32(&p).unwrap().data, [1.5, -2.0]);
        }
        let p = write_tmp(&dir, "v.npy", &npy_bytes((4, 0), header, &data));
        let err = read_f32(&p).unwrap_err().to_string();
        assert!(err.contains("unsupported format version 4.0"), "{err}");
        let mut latin1 = npy_bytes((2, 0), header, &data);
        let brace = latin1.iter().position(|&b| b == b'}').unwrap();
        latin1[brace + 1] = 0xe9;
        let p = write_tmp(&dir, "v.npy", &latin1);
        assert!(read_f32(&p)
            .unwrap_err()
            .to_string()
            .contains("unexpected text after the dict"));
        latin1[7] = 0;
        latin1[6] = 3;
        let p = write_tmp(&dir, "v.npy", &latin1);
        assert!(read_f32(&p)
            .unwrap_err()
            .to_string()
            .contains("not valid UTF-8"));
    }

    #[test]
    fn reports_truncation_and_trailing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.npy");
        write_f32(&p, &[2, 3], &[1.0; 6]).unwrap();
        let full = std::fs::read(&p).unwrap();
        let p = write_tmp(&dir, "state.npy", &full[..full.len() - 14]);
        let err = read_f32(&p).unwrap_err().to_string();
        assert!(err.contains("state.npy: not a valid .npy file: truncated: shape [2, 3] of float32 needs 24 data bytes, found 10"), "{err}");
        let mut long = full.clone();
        long.push(0);
        let p = write_tmp(&dir, "state.npy", &long);
        let err = read_f32(&p).unwrap_err().to_string();
        assert!(err.contains("1 unexpected trailing bytes"), "{err}");
        let p = write_tmp(&dir, "state.npy", &full[..40]);
        assert!(read_f32(&p)
            .unwrap_err()
            .to_string()
            .contains("truncated: the header is 118 bytes"));
        let p = write_tmp(&dir, "state.npy", &full[..9]);
        assert!(read_f32(&p)
            .unwrap_err()
            .to_string()
            .contains("inside the preamble"));
        let p = write_tmp(&dir, "state.npy", b"PK\x03\x04 not npy");
        assert!(read_f32(&p).unwrap_err().to_string().contains("magic"));
        let err = read_f32(&dir.path().join("absent.npy")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("absent.npy"));
    }

    #[test]
    fn guards_shape_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
            u64::MAX,
            4
        );
        let p = write_tmp(&dir, "huge.npy", &npy_bytes((1, 0), &header, &[0; 16]));
        let err = read_f32(&p).unwrap_err().to_string();
        assert!(err.contains("too large to address"), "{err}");
    }

    /// 20,000 nested `(` used to recurse once per level and overflow the stack (an abort,
    /// not an error). Nesting is bounded at MAX_NESTING levels, and the error names the file.
    #[test]
    fn refuses_deeply_nested_headers_without_recursing() {
        let dir = tempfile::tempdir().unwrap();
        let nested = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': {}}}",
            "(".repeat(20_000)
        );
        let p = write_tmp(&dir, "tokens.npy", &npy_bytes((2, 0), &nested, &[]));
        let err = read_f32(&p).unwrap_err().to_string();
        assert!(
            err.contains("tokens.npy: not a valid .npy file: header: tuples and lists nested more than 16 deep at offset 66"),
            "{err}"
        );
        // The same nesting as a list (the structured-dtype syntax) and in a format 1.0 file.
        let nested = format!(
            "{{'descr': {}, 'fortran_order': False, 'shape': ()}}",
            "[".repeat(60_000)
        );
        let p = write_tmp(&dir, "tokens.npy", &npy_bytes((1, 0), &nested, &[]));
        let err = read_i32(&p).unwrap_err().to_string();
        assert!(err.contains("nested more than 16 deep"), "{err}");

        // Sixteen levels still parse (and the shape is then refused for what it is).
        let ok_depth = |levels: usize| {
            let text = format!(
                "{{'descr': '<f4', 'fortran_order': False, 'shape': {}{}}}",
                "(".repeat(levels),
                ")".repeat(levels)
            );
            Header::parse(&text)
        };
        assert!(ok_depth(1).is_ok());
        let err = ok_depth(16).unwrap_err();
        assert!(err.contains("shape holds Tuple"), "{err}");
        assert!(ok_depth(17).unwrap_err().contains("nested more than 16"));
    }

    #[test]
    fn refuses_oversized_headers_and_descr_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let long = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }}{}",
            " ".repeat(70_000)
        );
        let p = write_tmp(&dir, "state.npy", &npy_bytes((2, 0), &long, &[0; 8]));
        let err = read_f32(&p).unwrap_err().to_string();
        assert!(
            err.contains(
                "state.npy: not a valid .npy file: the header is 70068 bytes, more than the 65536"
            ),
            "{err}"
        );
        // A byte size whose bit count overflows is named, not multiplied.
        let err = parse_descr("<i3000000000000000000").unwrap_err();
        assert!(err.contains("'<i3000000000000000000'"), "{err}");
        let err = parse_descr("<f3").unwrap_err();
        assert!(err.contains("float24"), "{err}");
    }

    #[test]
    fn refuses_devices_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_u8(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("is a directory; expected a .npy array file"),
            "{err}"
        );
        #[cfg(unix)]
        {
            let err = read_u8(Path::new("/dev/zero")).unwrap_err().to_string();
            assert!(err.contains("/dev/zero: is not a regular file"), "{err}");
        }
    }

    /// Every prefix and many single-byte corruptions of a valid file read back as Ok or Err,
    /// never as a panic.
    #[test]
    fn never_panics_on_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        write_i32(&p, &[2, 2], &[1, 2, 3, 4]).unwrap();
        let full = std::fs::read(&p).unwrap();
        for end in 0..full.len() {
            std::fs::write(&p, &full[..end]).unwrap();
            assert!(read_i32(&p).is_err());
        }
        for i in 0..full.len() {
            for b in [0u8, b'(', b')', b'\'', b',', b'9', 0xff] {
                let mut bytes = full.clone();
                bytes[i] = b;
                std::fs::write(&p, &bytes).unwrap();
                let _ = read_i32(&p);
                let _ = read_bool(&p);
                let _ = read_f32(&p);
            }
        }
    }

    #[test]
    fn reads_files_written_by_numpy() {
        let a = read_u8(&fixture("u8_2x3x3.npy")).unwrap();
        assert_eq!(a.shape, [2, 3, 3]);
        assert_eq!(
            a.data,
            (0..18u32).map(|i| (i * 13 % 256) as u8).collect::<Vec<_>>()
        );

        let a = read_bool(&fixture("bool_3.npy")).unwrap();
        assert_eq!(
            a,
            Array {
                shape: vec![3],
                data: vec![true, false, true]
            }
        );

        let a = read_i32(&fixture("int64_4.npy")).unwrap();
        assert_eq!(
            a,
            Array {
                shape: vec![4],
                data: vec![0, -1, i32::MAX, i32::MIN]
            }
        );
        let a = read_i32(&fixture("int32_2x2.npy")).unwrap();
        assert_eq!(
            a,
            Array {
                shape: vec![2, 2],
                data: vec![1, -2, 3, -4]
            }
        );

        let a = read_f32(&fixture("f32_2x2.npy")).unwrap();
        assert_eq!(
            a,
            Array {
                shape: vec![2, 2],
                data: vec![0.5, -1.25, 3.0, 1e-7]
            }
        );
        let a = read_f32(&fixture("f32_scalar.npy")).unwrap();
        assert_eq!(
            a,
            Array {
                shape: vec![],
                data: vec![2.5]
            }
        );
        let a = read_f32(&fixture("f32_0x3.npy")).unwrap();
        assert_eq!(
            a,
            Array {
                shape: vec![0, 3],
                data: vec![]
            }
        );
        for name in ["f32_v2.npy", "f32_v3.npy"] {
            let a = read_f32(&fixture(name)).unwrap();
            assert_eq!(
                a,
                Array {
                    shape: vec![3],
                    data: vec![1.0, 2.0, 3.0]
                },
                "{name}"
            );
        }
    }

    #[test]
    fn rejects_numpy_files_we_do_not_support() {
        let err = |name: &str, read: fn(&Path) -> Result<()>| {
            read(&fixture(name)).unwrap_err().to_string()
        };
        let f32_ = |p: &Path| read_f32(p).map(|_| ());
        let i32_ = |p: &Path| read_i32(p).map(|_| ());
        let bool_ = |p: &Path| read_bool(p).map(|_| ());
        for (name, read, msg) in [
            ("f32_fortran_2x3.npy", f32_ as fn(&Path) -> Result<()>, "f32_fortran_2x3.npy: expected C order (fortran_order False), found fortran_order True"),
            ("f64_3.npy", f32_, "f64_3.npy: expected dtype float32, found float64"),
            ("f32_be_2.npy", f32_, "expected dtype float32, found big-endian float32 ('>f4')"),
            ("f32_truncated.npy", f32_, "truncated: shape [4, 4] of float32 needs 64 data bytes, found 10"),
            ("int64_overflow.npy", i32_, "found 2147483648 at element 1"),
            ("bool_invalid.npy", bool_, "found byte 2 at element 2"),
            ("structured_2.npy", f32_, "structured dtypes are not supported"),
        ] {
            let e = err(name, read);
            assert!(e.contains(msg), "{name}: {e}");
        }
    }
}
