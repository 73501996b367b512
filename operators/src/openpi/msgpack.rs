//! openpi's wire format: MessagePack in which numpy arrays are maps `{"__ndarray__": true,
//! "data": <bytes>, "dtype": "<f4", "shape": [..]}` and numpy scalars are maps
//! `{"__npgeneric__": true, "data": <value>, "dtype": ".."}` (openpi-client's `msgpack_numpy`).
//!
//! Decoding borrows strings and array bytes from the message, bounds the nesting depth and the
//! number of values, and checks every declared length against the bytes that remain, so a
//! hostile message cannot make a reader allocate more than a small multiple of its own size.

use std::fmt;

use rmp::Marker;

/// A decoded MessagePack value; strings and bytes borrow from the message.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    /// An unsigned integer above `i64::MAX`.
    UInt(u64),
    Float(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    Ext(i8, &'a [u8]),
}

/// Bounds on what a message may contain.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deepest nesting of arrays and maps.
    pub max_depth: usize,
    /// Values in the whole message (every map key and value counts).
    pub max_values: usize,
}

impl Default for Limits {
    /// An openpi observation is a few dozen values two or three levels deep.
    fn default() -> Self {
        Limits {
            max_depth: 32,
            max_values: 1 << 20,
        }
    }
}

/// Why a message is not valid MessagePack (or exceeds the [`Limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Byte offset in the message where decoding stopped.
    pub offset: usize,
    pub reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed msgpack at byte {}: {}",
            self.offset, self.reason
        )
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one message that must hold exactly one value.
pub fn decode(bytes: &[u8], limits: Limits) -> Result<Value<'_>, DecodeError> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        values: 0,
        limits,
    };
    let v = r.value(0)?;
    if r.pos != bytes.len() {
        return Err(r.error(format!(
            "{} bytes left over after the message's value",
            bytes.len() - r.pos
        )));
    }
    Ok(v)
}

/// Elements reserved up front for a list or map; a longer one grows as its elements are read.
/// A declared length is only checked against the bytes left, and a container reserves before
/// its elements are read, so without a cap 32 nested lists each declaring the rest of the
/// message would reserve 32 `Value`s (1 KiB) per byte of it: a 16 MB message, 16 GB.
const RESERVE: usize = 256;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    values: usize,
    limits: Limits,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: String) -> DecodeError {
        DecodeError {
            offset: self.pos,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(self.error(format!(
                "truncated: {n} bytes declared, {left} left in the message"
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut w = [0u8; N];
        w.copy_from_slice(self.take(N)?);
        Ok(w)
    }

    fn len8(&mut self) -> Result<usize, DecodeError> {
        Ok(self.be::<1>()?[0] as usize)
    }
    fn len16(&mut self) -> Result<usize, DecodeError> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }
    fn len32(&mut self) -> Result<usize, DecodeError> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn str(&mut self, n: usize) -> Result<Value<'a>, DecodeError> {
        let at = self.pos;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(Value::Str)
            .map_err(|e| DecodeError {
                offset: at,
                reason: format!("a string that is not UTF-8 ({e})"),
            })
    }

    fn ext(&mut self, n: usize) -> Result<Value<'a>, DecodeError> {
        let ty = self.be::<1>()?[0] as i8;
        Ok(Value::Ext(ty, self.take(n)?))
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value<'a>, DecodeError> {
        // Every element takes at least one byte: a longer declaration is a lie.
        self.check_count(n, 1)?;
        let mut v = Vec::with_capacity(n.min(RESERVE));
        for _ in 0..n {
            v.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(v))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value<'a>, DecodeError> {
        self.check_count(n, 2)?;
        let mut v = Vec::with_capacity(n.min(RESERVE));
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            v.push((k, self.value(depth + 1)?));
        }
        Ok(Value::Map(v))
    }

    fn check_count(&self, n: usize, bytes_each: usize) -> Result<(), DecodeError> {
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(bytes_each) > left {
            return Err(self.error(format!(
                "truncated: {n} elements declared, {left} bytes left in the message"
            )));
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, DecodeError> {
        if depth > self.limits.max_depth {
            return Err(self.error(format!(
                "nested deeper than {} levels",
                self.limits.max_depth
            )));
        }
        self.values += 1;
        if self.values > self.limits.max_values {
            return Err(self.error(format!(
                "more than {} values in one message",
                self.limits.max_values
            )));
        }
        let byte = self.be::<1>()?[0];
        Ok(match Marker::from_u8(byte) {
            Marker::FixPos(v) => Value::Int(v as i64),
            Marker::FixNeg(v) => Value::Int(v as i64),
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::U8 => Value::Int(self.be::<1>()?[0] as i64),
            Marker::U16 => Value::Int(u16::from_be_bytes(self.be()?) as i64),
            Marker::U32 => Value::Int(u32::from_be_bytes(self.be()?) as i64),
            Marker::U64 => {
                let v = u64::from_be_bytes(self.be()?);
                i64::try_from(v).map_or(Value::UInt(v), Value::Int)
            }
            Marker::I8 => Value::Int(i8::from_be_bytes(self.be()?) as i64),
            Marker::I16 => Value::Int(i16::from_be_bytes(self.be()?) as i64),
            Marker::I32 => Value::Int(i32::from_be_bytes(self.be()?) as i64),
            Marker::I64 => Value::Int(i64::from_be_bytes(self.be()?)),
            Marker::F32 => Value::Float(f32::from_be_bytes(self.be()?) as f64),
            Marker::F64 => Value::Float(f64::from_be_bytes(self.be()?)),
            Marker::FixStr(n) => self.str(n as usize)?,
            Marker::Str8 => {
                let n = self.len8()?;
                self.str(n)?
            }
            Marker::Str16 => {
                let n = self.len16()?;
                self.str(n)?
            }
            Marker::Str32 => {
                let n = self.len32()?;
                self.str(n)?
            }
            Marker::Bin8 => {
                let n = self.len8()?;
                Value::Bin(self.take(n)?)
            }
            Marker::Bin16 => {
                let n = self.len16()?;
                Value::Bin(self.take(n)?)
            }
            Marker::Bin32 => {
                let n = self.len32()?;
                Value::Bin(self.take(n)?)
            }
            Marker::FixArray(n) => self.array(n as usize, depth)?,
            Marker::Array16 => {
                let n = self.len16()?;
                self.array(n, depth)?
            }
            Marker::Array32 => {
                let n = self.len32()?;
                self.array(n, depth)?
            }
            Marker::FixMap(n) => self.map(n as usize, depth)?,
            Marker::Map16 => {
                let n = self.len16()?;
                self.map(n, depth)?
            }
            Marker::Map32 => {
                let n = self.len32()?;
                self.map(n, depth)?
            }
            Marker::FixExt1 => self.ext(1)?,
            Marker::FixExt2 => self.ext(2)?,
            Marker::FixExt4 => self.ext(4)?,
            Marker::FixExt8 => self.ext(8)?,
            Marker::FixExt16 => self.ext(16)?,
            Marker::Ext8 => {
                let n = self.len8()?;
                self.ext(n)?
            }
            Marker::Ext16 => {
                let n = self.len16()?;
                self.ext(n)?
            }
            Marker::Ext32 => {
                let n = self.len32()?;
                self.ext(n)?
            }
            Marker::Reserved => {
                self.pos -= 1;
                return Err(self.error("reserved byte 0xc1".into()));
            }
        })
    }
}

impl<'a> Value<'a> {
    /// The value of `key` in a map whose keys are strings or bytes (numpy's packer writes
    /// byte keys, Python's str keys arrive as strings); None for other values or absent keys.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        let Value::Map(entries) = self else {
            return None;
        };
        entries
            .iter()
            .find(|(k, _)| k.key_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// A map key as text (a string, or UTF-8 bytes).
    pub fn key_str(&self) -> Option<&'a str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bin(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "a bool",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bin(_) => "bytes",
            Value::Array(_) => "a list",
            Value::Map(_) => "a map",
            Value::Ext(..) => "a msgpack extension",
        }
    }
}

/// A value to encode: what the server sends (metadata, actions, timings).
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Out>),
    Map(Vec<(String, Out)>),
    /// A numpy array as openpi-client decodes it (byte keys, `dtype` in numpy's notation,
    /// little-endian data in C order).
    NdArray {
        dtype: &'static str,
        shape: Vec<usize>,
        data: Vec<u8>,
    },
}

impl Out {
    /// A float64 array `shape` of `values`.
    pub fn f64_array(shape: Vec<usize>, values: &[f64]) -> Out {
        Out::NdArray {
            dtype: "<f8",
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A JSON value (metadata from the environment).
    pub fn from_json(v: &serde_json::Value) -> Out {
        match v {
            serde_json::Value::Null => Out::Nil,
            serde_json::Value::Bool(b) => Out::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Out::Int(i),
                None => Out::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Out::Str(s.clone()),
            serde_json::Value::Array(a) => Out::Array(a.iter().map(Out::from_json).collect()),
            serde_json::Value::Object(o) => Out::Map(
                o.iter()
                    .map(|(k, v)| (k.clone(), Out::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// The MessagePack encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.write(&mut buf);
        buf
    }

    fn write(&self, buf: &mut Vec<u8>) {
        use rmp::encode as e;
        // Writing into a Vec cannot fail; the writers' io::Error is never produced.
        fn ok<T, E: fmt::Debug>(r: Result<T, E>) {
            if let Err(err) = r {
                unreachable!("msgpack into a Vec failed: {err:?}");
            }
        }
        match self {
            Out::Nil => ok(e::write_nil(buf)),
            Out::Bool(b) => ok(e::write_bool(buf, *b)),
            Out::Int(i) => ok(e::write_sint(buf, *i)),
            Out::Float(f) => ok(e::write_f64(buf, *f)),
            Out::Str(s) => ok(e::write_str(buf, s)),
            Out::Array(items) => {
                ok(e::write_array_len(buf, len32(items.len())));
                for v in items {
                    v.write(buf);
                }
            }
            Out::Map(entries) => {
                ok(e::write_map_len(buf, len32(entries.len())));
                for (k, v) in entries {
                    ok(e::write_str(buf, k));
                    v.write(buf);
                }
            }
            Out::NdArray { dtype, shape, data } => {
                ok(e::write_map_len(buf, 4));
                ok(e::write_bin(buf, b"__ndarray__"));
                ok(e::write_bool(buf, true));
                ok(e::write_bin(buf, b"data"));
                ok(e::write_bin(buf, data));
                ok(e::write_bin(buf, b"dtype"));
                ok(e::write_str(buf, dtype));
                ok(e::write_bin(buf, b"shape"));
                ok(e::write_array_len(buf, len32(shape.len())));
                for &d in shape {
                    ok(e::write_uint(buf, d as u64));
                }
            }
        }
    }
}

/// A container length as msgpack's u32; the server's own values are far smaller.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_what_the_server_sends() {
        let out = Out::Map(vec![
            ("actions".into(), Out::f64_array(vec![2, 1], &[1.5, -2.0])),
            (
                "server_timing".into(),
                Out::Map(vec![("infer_ms".into(), Out::Float(3.25))]),
            ),
            ("n".into(), Out::Int(-7)),
            ("s".into(), Out::Str("x".into())),
            ("l".into(), Out::Array(vec![Out::Nil, Out::Bool(true)])),
        ]);
        let bytes = out.encode();
        let v = decode(&bytes, Limits::default()).unwrap();
        let a = v.get("actions").unwrap();
        assert_eq!(a.get("__ndarray__"), Some(&Value::Bool(true)));
        assert_eq!(a.get("dtype"), Some(&Value::Str("<f8")));
        let Some(Value::Bin(data)) = a.get("data") else {
            panic!("{a:?}")
        };
        assert_eq!(&data[..8], &1.5f64.to_le_bytes());
        // numpy's packer writes byte keys: they must be bin, not str, for openpi-client.
        let Value::Map(entries) = a else { panic!() };
        assert!(entries.iter().all(|(k, _)| matches!(k, Value::Bin(_))));
        assert_eq!(
            v.get("server_timing").and_then(|t| t.get("infer_ms")),
            Some(&Value::Float(3.25))
        );
        assert_eq!(v.get("n"), Some(&Value::Int(-7)));
    }

    #[test]
    fn rejects_truncated_lying_and_deep_messages() {
        // A map declaring 2^32-1 entries in a 5-byte message.
        let e = decode(&[0xdf, 0xff, 0xff, 0xff, 0xff], Limits::default()).unwrap_err();
        assert!(e.reason.contains("elements declared"), "{e}");
        // A bin declaring 1000 bytes with 2 present.
        let e = decode(&[0xc5, 0x03, 0xe8, 1, 2], Limits::default()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // Trailing garbage.
        let e = decode(&[0xc0, 0xc0], Limits::default()).unwrap_err();
        assert!(e.reason.contains("left over"), "{e}");
        // 0xc1 is never valid.
        let e = decode(&[0xc1], Limits::default()).unwrap_err();
        assert_eq!(e.offset, 0);
        // Deep nesting: 100 nested one-element arrays.
        let mut deep = vec![0x91u8; 100];
        deep.push(0xc0);
        let e = decode(&deep, Limits::default()).unwrap_err();
        assert!(e.reason.contains("nested deeper"), "{e}");
        // Too many values.
        let mut many = vec![0xdc, 0x00, 0x10];
        many.extend([0xc0; 16]);
        let e = decode(
            &many,
            Limits {
                max_depth: 4,
                max_values: 8,
            },
        )
        .unwrap_err();
        assert!(e.reason.contains("more than 8 values"), "{e}");
        assert!(decode(&many, Limits::default()).is_ok());
        // Invalid UTF-8 in a string.
        let e = decode(&[0xa2, 0xff, 0xfe], Limits::default()).unwrap_err();
        assert!(e.reason.contains("UTF-8"), "{e}");
        assert!(decode(&[], Limits::default()).is_err());
    }

    #[test]
    fn decodes_every_scalar_width() {
        let cases: &[(&[u8], Value)] = &[
            (&[0x05], Value::Int(5)),
            (&[0xff], Value::Int(-1)),
            (&[0xcc, 200], Value::Int(200)),
            (&[0xcd, 1, 0], Value::Int(256)),
            (&[0xd0, 0x80], Value::Int(-128)),
            (&[0xd1, 0xff, 0x00], Value::Int(-256)),
            (
                &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                Value::UInt(u64::MAX),
            ),
            (&[0xca, 0x3f, 0xc0, 0, 0], Value::Float(1.5)),
            (&[0xc3], Value::Bool(true)),
            (&[0xa1, b'a'], Value::Str("a")),
            (&[0xc4, 1, 9], Value::Bin(&[9])),
            (&[0xd4, 3, 7], Value::Ext(3, &[7])),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                &decode(bytes, Limits::default()).unwrap(),
                want,
                "{bytes:?}"
            );
        }
    }
}
