//! numpy values inside an openpi message: arrays, scalars, plain msgpack numbers and lists,
//! read into the types the transforms need. Every error names the observation key.

use std::borrow::Cow;

use half::f16;

use super::msgpack::Value;
use crate::{Error, Result};

/// The element type of a numpy array (`dtype.str`, e.g. `<f4`, `|u1`, `<U5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DType {
    pub kind: Kind,
    /// Bytes per element.
    pub size: usize,
    pub big_endian: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    UInt,
    Float,
    /// numpy `U`: UTF-32 text, `size` bytes (4 per character).
    Unicode,
    /// numpy `S`: bytes.
    Bytes,
}

impl DType {
    pub fn parse(s: &str) -> Option<DType> {
        // numpy's dtype strings are a few characters ("<U100000" is 8); a longer one is not
        // one, and would only bloat the error that echoes it.
        if s.len() > 16 {
            return None;
        }
        let t = crate::npy::TypeStr::parse(s)?;
        let kind = match t.kind {
            'b' => Kind::Bool,
            'i' => Kind::Int,
            'u' => Kind::UInt,
            'f' => Kind::Float,
            'U' => Kind::Unicode,
            'S' => Kind::Bytes,
            _ => return None,
        };
        let size = if kind == Kind::Unicode {
            t.count.checked_mul(4)?
        } else {
            t.count
        };
        let ok = match kind {
            Kind::Bool => size == 1,
            Kind::Int | Kind::UInt => matches!(size, 1 | 2 | 4 | 8),
            Kind::Float => matches!(size, 2 | 4 | 8),
            Kind::Unicode | Kind::Bytes => true,
        };
        ok.then_some(DType {
            kind,
            size,
            big_endian: t.big_endian(),
        })
    }

    fn numeric(self) -> bool {
        matches!(self.kind, Kind::Bool | Kind::Int | Kind::UInt | Kind::Float)
    }
}

/// A numpy array borrowed from a message.
#[derive(Debug, Clone)]
pub struct NdArray<'a> {
    pub dtype: DType,
    /// numpy's dtype string as sent.
    pub dtype_str: &'a str,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

fn bad(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("`{what}`: {msg}"))
}

impl<'a> NdArray<'a> {
    /// The array encoded by `v`, None when `v` is not an `__ndarray__` map.
    pub fn from_value(v: &Value<'a>, what: &str) -> Option<Result<NdArray<'a>>> {
        v.get("__ndarray__")?;
        Some(Self::parse(v, what))
    }

    fn parse(v: &Value<'a>, what: &str) -> Result<NdArray<'a>> {
        let dtype_str = match v.get("dtype") {
            Some(Value::Str(s)) => *s,
            Some(Value::Bin(b)) => {
                std::str::from_utf8(b).map_err(|_| bad(what, "numpy array `dtype` is not text"))?
            }
            _ => return Err(bad(what, "numpy array without a `dtype` string")),
        };
        let dtype = DType::parse(dtype_str).ok_or_else(|| {
            bad(
                what,
                format!("unsupported numpy dtype `{}`", short(dtype_str)),
            )
        })?;
        let Some(Value::Array(dims)) = v.get("shape") else {
            return Err(bad(what, "numpy array without a `shape` list"));
        };
        let shape = dims
            .iter()
            .map(|d| match d {
                Value::Int(n) => usize::try_from(*n).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad(what, "numpy array `shape` must hold non-negative integers"))?;
        let data = match v.get("data") {
            Some(Value::Bin(b)) => *b,
            _ => return Err(bad(what, "numpy array without `data` bytes")),
        };
        let want = shape
            .iter()
            .try_fold(dtype.size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(what, format!("shape {shape:?} is too large")))?;
        if data.len() != want {
            return Err(bad(
                what,
                format!(
                    "shape {shape:?} of dtype {dtype_str} needs {want} bytes, the array holds {}",
                    data.len()
                ),
            ));
        }
        Ok(NdArray {
            dtype,
            dtype_str,
            shape,
            data,
        })
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn word<const N: usize>(&self, i: usize) -> [u8; N] {
        let mut w = [0u8; N];
        w.copy_from_slice(&self.data[i * N..(i + 1) * N]);
        if self.dtype.big_endian {
            w.reverse();
        }
        w
    }

    /// Element `i` of a numeric array as f64 (exact for every integer dtype up to 2^53).
    fn f64_at(&self, i: usize) -> f64 {
        match (self.dtype.kind, self.dtype.size) {
            (Kind::Bool, _) | (Kind::UInt, 1) => self.data[i] as f64,
            (Kind::Int, 1) => self.data[i] as i8 as f64,
            (Kind::UInt, 2) => u16::from_le_bytes(self.word(i)) as f64,
            (Kind::Int, 2) => i16::from_le_bytes(self.word(i)) as f64,
            (Kind::UInt, 4) => u32::from_le_bytes(self.word(i)) as f64,
            (Kind::Int, 4) => i32::from_le_bytes(self.word(i)) as f64,
            (Kind::UInt, 8) => u64::from_le_bytes(self.word(i)) as f64,
            (Kind::Int, 8) => i64::from_le_bytes(self.word(i)) as f64,
            (Kind::Float, 2) => f16::from_le_bytes(self.word(i)).to_f64(),
            (Kind::Float, 4) => f32::from_le_bytes(self.word(i)) as f64,
            (Kind::Float, 8) => f64::from_le_bytes(self.word(i)),
            _ => f64::NAN,
        }
    }

    /// Every element as f64; an error for non-numeric dtypes.
    pub fn to_f64(&self, what: &str) -> Result<Vec<f64>> {
        if !self.dtype.numeric() {
            return Err(bad(
                what,
                format!("expected numbers, found dtype {}", self.dtype_str),
            ));
        }
        Ok((0..self.len()).map(|i| self.f64_at(i)).collect())
    }

    /// Every element as i64 (integer and bool dtypes only).
    pub fn to_i64(&self, what: &str) -> Result<Vec<i64>> {
        match self.dtype.kind {
            Kind::Bool | Kind::Int | Kind::UInt => {}
            _ => {
                return Err(bad(
                    what,
                    format!("expected integers, found dtype {}", self.dtype_str),
                ))
            }
        }
        (0..self.len())
            .map(|i| match (self.dtype.kind, self.dtype.size) {
                (Kind::UInt, 8) => {
                    let v = u64::from_le_bytes(self.word(i));
                    i64::try_from(v).map_err(|_| bad(what, format!("value {v} is out of range")))
                }
                (Kind::Int, 8) => Ok(i64::from_le_bytes(self.word(i))),
                _ => Ok(self.f64_at(i) as i64),
            })
            .collect()
    }
}

/// A numeric value: a numpy array or scalar, a number, or a (nested, rectangular) list of
/// any of these (openpi-client packs a list of numpy scalars, e.g. `[np.float32(0.1), ...]`,
/// as a list of `__npgeneric__` maps; openpi's `np.asarray` stacks it like an array);
/// returned as (shape, values in C order).
pub fn numbers(v: &Value, what: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let mut out = Vec::new();
    let shape = collect_numbers(v, what, &mut out)?;
    Ok((shape, out))
}

/// Appends the values of `v` to `out` in C order; returns the shape of `v`.
fn collect_numbers(v: &Value, what: &str, out: &mut Vec<f64>) -> Result<Vec<usize>> {
    if let Some(a) = NdArray::from_value(v, what) {
        let a = a?;
        out.extend(a.to_f64(what)?);
        return Ok(a.shape);
    }
    if let Some(x) = np_scalar(v, what)? {
        out.push(x);
        return Ok(vec![]);
    }
    match v {
        Value::Int(_) | Value::UInt(_) | Value::Float(_) | Value::Bool(_) => {
            out.push(scalar(v, what)?);
            Ok(vec![])
        }
        Value::Array(items) => {
            let mut inner: Option<Vec<usize>> = None;
            for item in items {
                let s = collect_numbers(item, what, out)?;
                match &inner {
                    Some(i) if *i != s => {
                        return Err(bad(
                            what,
                            format!("a list whose items have different shapes ({i:?} and {s:?})"),
                        ));
                    }
                    Some(_) => {}
                    None => inner = Some(s),
                }
            }
            let mut shape = vec![items.len()];
            shape.extend(inner.unwrap_or_default());
            Ok(shape)
        }
        other => Err(bad(
            what,
            format!("expected a numpy array or numbers, found {}", other.kind()),
        )),
    }
}

/// A numeric numpy scalar (`__npgeneric__`) as f64, None when `v` is not one. openpi-client
/// packs its `item()` (a Python number) as `data`; raw little-endian bytes of its `dtype` are
/// accepted too.
fn np_scalar(v: &Value, what: &str) -> Result<Option<f64>> {
    if v.get("__npgeneric__").is_none() {
        return Ok(None);
    }
    let data = v
        .get("data")
        .ok_or_else(|| bad(what, "numpy scalar without `data`"))?;
    let Value::Bin(bytes) = data else {
        return scalar(data, what).map(Some);
    };
    let dtype_str = match v.get("dtype") {
        Some(d) => d.key_str(),
        None => None,
    }
    .ok_or_else(|| bad(what, "numpy scalar with `data` bytes but no `dtype` string"))?;
    let dtype = DType::parse(dtype_str)
        .filter(|d| d.numeric())
        .ok_or_else(|| {
            bad(
                what,
                format!(
                    "expected a number, found a numpy scalar of dtype `{}`",
                    short(dtype_str)
                ),
            )
        })?;
    if bytes.len() != dtype.size {
        return Err(bad(
            what,
            format!(
                "a numpy scalar of dtype {} needs {} bytes, `data` holds {}",
                short(dtype_str),
                dtype.size,
                bytes.len()
            ),
        ));
    }
    let a = NdArray {
        dtype,
        dtype_str,
        shape: vec![],
        data: bytes,
    };
    Ok(Some(a.f64_at(0)))
}

fn scalar(v: &Value, what: &str) -> Result<f64> {
    match v {
        Value::Int(i) => Ok(*i as f64),
        Value::UInt(u) => Ok(*u as f64),
        Value::Float(f) => Ok(*f),
        Value::Bool(b) => Ok(*b as u8 as f64),
        other => Err(bad(
            what,
            format!("expected a number, found {}", other.kind()),
        )),
    }
}

/// Text from the client, cut for an error message (a message may carry megabytes of it).
pub fn short(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}... ({} bytes)", &s[..end], s.len()),
        None => s.to_string(),
    }
}

/// Text: a string, UTF-8 bytes, or a numpy string array or scalar of one element (openpi
/// accepts `prompt` as any of these). Strings and bytes are borrowed from the message.
pub fn text<'a>(v: &Value<'a>, what: &str) -> Result<Cow<'a, str>> {
    match v {
        Value::Str(s) => return Ok(Cow::Borrowed(s)),
        Value::Bin(b) => {
            return std::str::from_utf8(b)
                .map(Cow::Borrowed)
                .map_err(|_| bad(what, "bytes that are not UTF-8 text"))
        }
        _ => {}
    }
    if v.get("__npgeneric__").is_some() {
        if let Some(d) = v.get("data") {
            return text(d, what);
        }
    }
    if let Some(a) = NdArray::from_value(v, what) {
        let a = a?;
        if a.len() != 1 {
            return Err(bad(
                what,
                format!("expected one string, found an array of shape {:?}", a.shape),
            ));
        }
        return match a.dtype.kind {
            Kind::Unicode => {
                let mut s = String::new();
                for i in 0..a.dtype.size / 4 {
                    let c = u32::from_le_bytes(a.word::<4>(i));
                    if c == 0 {
                        break;
                    }
                    s.push(
                        char::from_u32(c)
                            .ok_or_else(|| bad(what, "invalid character in a numpy string"))?,
                    );
                }
                Ok(Cow::Owned(s))
            }
            Kind::Bytes => {
                let end = a.data.iter().position(|&b| b == 0).unwrap_or(a.data.len());
                std::str::from_utf8(&a.data[..end])
                    .map(Cow::Borrowed)
                    .map_err(|_| bad(what, "bytes that are not UTF-8 text"))
            }
            _ => Err(bad(
                what,
                format!("expected text, found dtype {}", a.dtype_str),
            )),
        };
    }
    Err(bad(what, format!("expected text, found {}", v.kind())))
}

/// An RGB image in HWC order, u8.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

/// How a robot format lays out its camera images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// HWC, or CHW when the first dimension is 3 (LIBERO, DROID).
    HwcOrChw,
    /// Always CHW (ALOHA).
    Chw,
}

/// A camera image: a numpy array of 3 dimensions, uint8 or float (floats are scaled by 255
/// and truncated to uint8, as openpi does; values outside [0, 1] saturate), 3 channels.
pub fn image(v: &Value, what: &str, layout: Layout) -> Result<Image> {
    let a = NdArray::from_value(v, what).ok_or_else(|| {
        bad(
            what,
            format!(
                "expected an image as a numpy array (uint8 [H, W, 3]), found {}",
                v.kind()
            ),
        )
    })??;
    let float = match (a.dtype.kind, a.dtype.size) {
        (Kind::UInt, 1) => false,
        (Kind::Float, _) => true,
        _ => {
            return Err(bad(
                what,
                format!(
                    "expected a uint8 (or float in [0, 1]) image, found dtype {}",
                    a.dtype_str
                ),
            ))
        }
    };
    let [d0, d1, d2] = a.shape[..] else {
        return Err(bad(
            what,
            format!(
                "expected an image of shape [H, W, 3] or [3, H, W], found shape {:?}",
                a.shape
            ),
        ));
    };
    let chw = match layout {
        Layout::Chw => true,
        Layout::HwcOrChw => d0 == 3,
    };
    let (h, w, c) = if chw { (d1, d2, d0) } else { (d0, d1, d2) };
    if c != 3 {
        return Err(bad(
            what,
            format!(
                "expected 3 color channels ({}), found shape {:?}",
                if layout == Layout::Chw {
                    "[3, H, W]"
                } else {
                    "[H, W, 3] or [3, H, W]"
                },
                a.shape
            ),
        ));
    }
    if h == 0 || w == 0 {
        return Err(bad(what, format!("empty image of shape {:?}", a.shape)));
    }
    // numpy: (255 * image).astype(np.uint8), in the image's own float type.
    let bytes: Cow<[u8]> = if float {
        (0..h * w * 3)
            .map(|i| match a.dtype.size {
                2 => (f16::from_f32(255.0 * f16::from_le_bytes(a.word(i)).to_f32())).to_f32() as u8,
                4 => (255.0f32 * f32::from_le_bytes(a.word(i))) as u8,
                _ => (255.0f64 * f64::from_le_bytes(a.word(i))) as u8,
            })
            .collect::<Vec<u8>>()
            .into()
    } else {
        a.data.into()
    };
    let data = if chw {
        let plane = h * w;
        let mut data = vec![0u8; plane * 3];
        for (i, px) in data.chunks_exact_mut(3).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                *v = bytes[ch * plane + i];
            }
        }
        data
    } else {
        bytes.into_owned()
    };
    Ok(Image {
        height: h,
        width: w,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openpi::msgpack::{decode, Limits, Out};

    fn nd(dtype: &'static str, shape: Vec<usize>, data: Vec<u8>) -> Vec<u8> {
        Out::NdArray { dtype, shape, data }.encode()
    }

    #[test]
    fn reads_numpy_arrays_of_every_numeric_dtype() {
        let bytes = nd(
            "<f4",
            vec![2],
            [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
        let v = decode(&bytes, Limits::default()).unwrap();
        assert_eq!(numbers(&v, "s").unwrap(), (vec![2], vec![1.5, -2.0]));
        let bytes = nd(">i2", vec![1], vec![0xff, 0xfe]);
        let v = decode(&bytes, Limits::default()).unwrap();
        assert_eq!(numbers(&v, "s").unwrap().1, vec![-2.0]);
        let bytes = nd("<f2", vec![1], f16::from_f32(0.5).to_le_bytes().to_vec());
        let v = decode(&bytes, Limits::default()).unwrap();
        assert_eq!(numbers(&v, "s").unwrap().1, vec![0.5]);
        // Plain lists and scalars, as np.asarray would take them.
        let list = Out::Array(vec![Out::Int(1), Out::Float(2.5)]).encode();
        let v = decode(&list, Limits::default()).unwrap();
        assert_eq!(numbers(&v, "s").unwrap(), (vec![2], vec![1.0, 2.5]));
        let scalar = Out::Map(vec![
            ("__npgeneric__".into(), Out::Bool(true)),
            ("data".into(), Out::Float(0.25)),
            ("dtype".into(), Out::Str("<f8".into())),
        ])
        .encode();
        let v = decode(&scalar, Limits::default()).unwrap();
        assert_eq!(numbers(&v, "g").unwrap(), (vec![], vec![0.25]));
        // Data shorter than the shape says.
        let bytes = nd("<f4", vec![3], vec![0; 8]);
        let v = decode(&bytes, Limits::default()).unwrap();
        let e = numbers(&v, "observation/state").unwrap_err().to_string();
        assert!(
            e.contains("`observation/state`") && e.contains("needs 12 bytes"),
            "{e}"
        );
        let bytes = nd("<c8", vec![1], vec![0; 8]);
        let v = decode(&bytes, Limits::default()).unwrap();
        let e = numbers(&v, "x").unwrap_err().to_string();
        assert!(e.contains("unsupported numpy dtype `<c8`"), "{e}");
    }

    #[test]
    fn images_in_hwc_chw_and_float() {
        // [3, 1, 2] CHW -> [1, 2, 3] HWC.
        let bytes = nd("|u1", vec![3, 1, 2], vec![1, 2, 3, 4, 5, 6]);
        let v = decode(&bytes, Limits::default()).unwrap();
        let img = image(&v, "i", Layout::HwcOrChw).unwrap();
        assert_eq!((img.height, img.width), (1, 2));
        assert_eq!(img.data, vec![1, 3, 5, 2, 4, 6]);
        let floats: Vec<u8> = [0.0f32, 0.5, 1.0, 0.999, 2.0, -1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = nd("<f4", vec![1, 2, 3], floats);
        let v = decode(&bytes, Limits::default()).unwrap();
        let img = image(&v, "i", Layout::HwcOrChw).unwrap();
        assert_eq!(img.data, vec![0, 127, 255, 254, 255, 0]);
        let bytes = nd("<i4", vec![1, 1, 3], vec![0; 12]);
        let v = decode(&bytes, Limits::default()).unwrap();
        let e = image(&v, "observation/image", Layout::HwcOrChw)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`observation/image`") && e.contains("dtype <i4"),
            "{e}"
        );
        let bytes = nd("|u1", vec![4, 4], vec![0; 16]);
        let v = decode(&bytes, Limits::default()).unwrap();
        let e = image(&v, "cam", Layout::HwcOrChw).unwrap_err().to_string();
        assert!(e.contains("found shape [4, 4]"), "{e}");
        let bytes = nd("|u1", vec![2, 2, 1], vec![0; 4]);
        let v = decode(&bytes, Limits::default()).unwrap();
        assert!(image(&v, "cam", Layout::HwcOrChw).is_err());
        assert!(image(&Value::Str("x"), "cam", Layout::Chw).is_err());
    }

    #[test]
    fn text_from_strings_bytes_and_numpy() {
        assert_eq!(text(&Value::Str("pick"), "p").unwrap(), "pick");
        assert_eq!(text(&Value::Bin(b"up"), "p").unwrap(), "up");
        let utf32: Vec<u8> = "héllo\0\0"
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        let bytes = nd("<U7", vec![], utf32);
        let v = decode(&bytes, Limits::default()).unwrap();
        assert_eq!(text(&v, "p").unwrap(), "héllo");
        assert!(text(&Value::Int(3), "prompt")
            .unwrap_err()
            .to_string()
            .contains("`prompt`"));
    }
}
