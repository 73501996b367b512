//! Camera decode: JPEG / PNG / raw RGB frames to u8 `size`x`size` RGB, resized with padding
//! exactly as the model input path does (openpi's resize_with_pad), then rounded back to u8;
//! and the JPEG encoding a robot applies before frames cross a network.

use crate::{image as img, Error, Result};

/// How a camera frame is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Raw interleaved RGB, `height` x `width` x 3 bytes.
    Raw { height: usize, width: usize },
    /// A PNG or JPEG file's bytes (the format is read from the data).
    Encoded,
}

/// Decodes one frame to RGB: (pixels, height, width).
pub fn decode_rgb(data: &[u8], encoding: Encoding) -> Result<(Vec<u8>, usize, usize)> {
    match encoding {
        Encoding::Raw { height, width } => {
            let want = height.checked_mul(width).and_then(|n| n.checked_mul(3));
            if want != Some(data.len()) || height == 0 || width == 0 {
                return Err(Error::Input(format!(
                    "raw RGB frame of {height}x{width} needs {} bytes, got {}",
                    want.map_or("too many".to_string(), |n| n.to_string()),
                    data.len()
                )));
            }
            Ok((data.to_vec(), height, width))
        }
        Encoding::Encoded => {
            let decoded = image::load_from_memory(data).map_err(|e| {
                Error::Input(format!(
                    "cannot decode frame ({} bytes) as PNG or JPEG: {e}",
                    data.len()
                ))
            })?;
            let rgb = decoded.to_rgb8();
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            Ok((rgb.into_raw(), h, w))
        }
    }
}

/// RGB u8 [h, w, 3] -> RGB u8 [size, size, 3]. Frames already `size`x`size` pass unchanged.
pub fn resize_with_pad_u8(pixels: &[u8], height: usize, width: usize, size: usize) -> Vec<u8> {
    if height == size && width == size {
        return pixels.to_vec();
    }
    img::to_model_input(pixels, height, width, size)
        .into_iter()
        .map(|v| ((v + 1.0) / 2.0 * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Encodes raw interleaved RGB (`height` x `width` x 3) as a baseline JPEG of `quality`
/// (1 to 100). Deterministic: the same pixels and quality give the same bytes.
pub fn encode_jpeg(pixels: &[u8], height: usize, width: usize, quality: u8) -> Result<Vec<u8>> {
    if !(1..=100).contains(&quality) {
        return Err(Error::Input(format!(
            "JPEG quality {quality} must be between 1 and 100"
        )));
    }
    let (h, w) = match (u16::try_from(height), u16::try_from(width)) {
        (Ok(h), Ok(w)) if h > 0 && w > 0 => (h, w),
        _ => {
            return Err(Error::Input(format!(
                "cannot JPEG-encode a {height}x{width} frame (1 to 65535 pixels a side)"
            )))
        }
    };
    if pixels.len() != height * width * 3 {
        return Err(Error::Input(format!(
            "raw RGB frame of {height}x{width} needs {} bytes, got {}",
            height * width * 3,
            pixels.len()
        )));
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(pixels, w.into(), h.into(), image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Input(format!("JPEG encoding failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_round_trip_is_close_and_deterministic() {
        let (h, w) = (16, 24);
        let px: Vec<u8> = (0..h * w * 3)
            .map(|i| ((i / 3 % w) * 10 + (i % 3) * 40) as u8)
            .collect();
        let a = encode_jpeg(&px, h, w, 90).unwrap();
        assert_eq!(a, encode_jpeg(&px, h, w, 90).unwrap(), "deterministic");
        assert!(a.len() < px.len(), "{} bytes", a.len());
        let (back, hh, ww) = decode_rgb(&a, Encoding::Encoded).unwrap();
        assert_eq!((hh, ww), (h, w));
        let worst = back.iter().zip(&px).map(|(x, y)| x.abs_diff(*y)).max();
        assert!(worst.is_some_and(|d| d < 40), "{worst:?}");
        let err = encode_jpeg(&px, h, w, 0).unwrap_err().to_string();
        assert!(err.contains("between 1 and 100"), "{err}");
        let err = encode_jpeg(&px[1..], h, w, 90).unwrap_err().to_string();
        assert!(err.contains("needs 1152 bytes, got 1151"), "{err}");
        let err = encode_jpeg(&[], 0, 4, 90).unwrap_err().to_string();
        assert!(err.contains("0x4"), "{err}");
    }

    #[test]
    fn png_round_trip_and_raw() {
        let (w, h) = (5u32, 3u32);
        let raw: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect();
        let mut png = Vec::new();
        image::RgbImage::from_raw(w, h, raw.clone())
            .unwrap()
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let (px, hh, ww) = decode_rgb(&png, Encoding::Encoded).unwrap();
        assert_eq!((px.clone(), hh, ww), (raw.clone(), 3, 5));
        let (px2, _, _) = decode_rgb(
            &raw,
            Encoding::Raw {
                height: 3,
                width: 5,
            },
        )
        .unwrap();
        assert_eq!(px2, px);
        let err = decode_rgb(
            &raw[1..],
            Encoding::Raw {
                height: 3,
                width: 5,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs 45 bytes, got 44"), "{err}");
        assert!(decode_rgb(b"garbage", Encoding::Encoded).is_err());
    }

    #[test]
    fn resize_pads_with_black_and_keeps_same_size_frames() {
        let px: Vec<u8> = (0..4 * 2 * 3).map(|i| 100 + i as u8).collect();
        let out = resize_with_pad_u8(&px, 4, 2, 4);
        assert_eq!(out.len(), 4 * 4 * 3);
        // 4x2 -> 4x2 centred in 4x4: columns 0 and 3 are padding.
        assert_eq!(&out[0..3], &[0, 0, 0]);
        assert_eq!(&out[3..6], &px[0..3]);
        let same: Vec<u8> = (0..48).map(|i| i as u8 * 5).collect();
        assert_eq!(resize_with_pad_u8(&same, 4, 4, 4), same);
    }
}
