//! Camera decode: JPEG / PNG / raw RGB frames of every camera to one u8 tensor
//! [num_images, image_size, image_size, 3] (openpi's resize with padding); cameras the robot
//! lacks are filled with black and masked out (`image_masks` metadata).

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraArray, DoraNode, Event, EventStream, MetadataParameters, Parameter};
use eyre::{bail, eyre, Result};
use node_common::{env_or, list_param, report_rejected, str_param, FrameMeta, SeqGaps};
use operators::decode::{decode_rgb, resize_with_pad_u8, Encoding};

pub struct Settings {
    pub num_images: usize,
    pub image_size: usize,
}

impl Settings {
    /// Env: `NUM_IMAGES` (3), `IMAGE_SIZE` (224).
    pub fn from_env() -> Result<Self> {
        let s = Settings {
            num_images: env_or("NUM_IMAGES", 3)?,
            image_size: env_or("IMAGE_SIZE", 224)?,
        };
        if s.num_images == 0 || s.image_size == 0 {
            bail!("env NUM_IMAGES and IMAGE_SIZE must be positive");
        }
        Ok(s)
    }
}

/// Decodes one `frames` message into (images, masks).
pub fn decode_frames(
    settings: &Settings,
    md: &MetadataParameters,
    data: &DoraArray,
) -> Result<(Vec<u8>, Vec<bool>)> {
    let bytes: &[u8] = data.try_into().map_err(|_| {
        eyre!(
            "input `frames`: expected a uint8 array, found {}",
            data.type_name()
        )
    })?;
    let s = settings.image_size;
    let mut cams: Vec<Vec<u8>> = Vec::new();
    match str_param(md, "encoding") {
        Some("raw") => {
            let shape = list_param(md, "shape").unwrap_or_default();
            let [n, h, w, 3] = shape.as_slice() else {
                bail!("input `frames`: raw frames need metadata shape [cameras, H, W, 3], found {shape:?}");
            };
            let (n, h, w) = (*n as usize, *h as usize, *w as usize);
            if n.checked_mul(h).and_then(|v| v.checked_mul(w * 3)) != Some(bytes.len()) {
                bail!(
                    "input `frames`: shape {shape:?} needs {} bytes, found {}",
                    n * h * w * 3,
                    bytes.len()
                );
            }
            for c in bytes.chunks_exact(h * w * 3) {
                let (px, hh, ww) = decode_rgb(
                    c,
                    Encoding::Raw {
                        height: h,
                        width: w,
                    },
                )?;
                cams.push(resize_with_pad_u8(&px, hh, ww, s));
            }
        }
        Some("encoded") => {
            let offsets = list_param(md, "offsets").unwrap_or_default();
            if offsets.len() < 2
                || offsets.windows(2).any(|w| w[0] > w[1])
                || offsets.last() != Some(&(bytes.len() as i64))
            {
                bail!(
                    "input `frames`: `offsets` {offsets:?} do not split {} bytes into cameras",
                    bytes.len()
                );
            }
            for (i, w) in offsets.windows(2).enumerate() {
                let (px, h, wd) =
                    decode_rgb(&bytes[w[0] as usize..w[1] as usize], Encoding::Encoded)
                        .map_err(|e| eyre!("input `frames`, camera {i}: {e}"))?;
                cams.push(resize_with_pad_u8(&px, h, wd, s));
            }
        }
        other => bail!(
            "input `frames`: metadata `encoding` must be \"raw\" or \"encoded\", found {other:?}"
        ),
    }
    if cams.len() > settings.num_images {
        bail!(
            "input `frames`: {} cameras, but the model takes NUM_IMAGES={}",
            cams.len(),
            settings.num_images
        );
    }
    let masks: Vec<bool> = (0..settings.num_images).map(|i| i < cams.len()).collect();
    let mut images = cams.concat();
    images.resize(settings.num_images * s * s * 3, 0);
    Ok((images, masks))
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    run_with(Settings::from_env()?, node, events)
}

pub fn run_with(settings: Settings, mut node: DoraNode, mut events: EventStream) -> Result<()> {
    let out: DataId = "images".to_string().into();
    let tracer = node_common::tracer(&node, "cpu")?;
    let mut gaps = SeqGaps::default();
    while let Some(event) = events.recv() {
        if let Event::Input { id, metadata, data } = event {
            if id.as_str() != "frames" {
                continue;
            }
            let md = &metadata.parameters;
            let result = FrameMeta::from_metadata("frames", md).and_then(|meta| {
                gaps.observe(meta.seq);
                let span = tracer.start("decode", meta.seq, meta.trace);
                let meta = meta.traced(span.id());
                let (images, masks) = decode_frames(&settings, md, &data)?;
                let s = settings.image_size;
                let mut p = meta.tensor_params(&[settings.num_images, s, s, 3], "uint8");
                p.insert(
                    "image_masks".into(),
                    Parameter::ListInt(masks.iter().map(|&m| m as i64).collect()),
                );
                node.send_output(out.clone(), p, images)
                    .map_err(|e| eyre!("sending images: {e}"))?;
                span.end();
                Ok(())
            });
            if let Err(e) = result {
                report_rejected("decode", &e);
            }
        }
    }
    eprintln!("decode: {} frames, {} gaps", gaps.frames, gaps.gaps);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::integration_testing::integration_testing_format::{
        IncomingEvent, InputData, TimedIncomingEvent,
    };
    use dora_node_api::integration_testing::{
        self, IntegrationTestInput, TestingInput, TestingOptions, TestingOutput,
    };

    fn frame_event(t: f64, seq: i64, shape: Vec<i64>, bytes: Vec<u8>) -> TimedIncomingEvent {
        let mut md = MetadataParameters::new();
        md.insert("seq".into(), Parameter::Integer(seq));
        md.insert("t_capture_ns".into(), Parameter::Integer(1));
        md.insert("encoding".into(), Parameter::String("raw".into()));
        md.insert("shape".into(), Parameter::ListInt(shape));
        md.insert("dtype".into(), Parameter::String("uint8".into()));
        TimedIncomingEvent {
            time_offset_secs: t,
            event: IncomingEvent::Input {
                id: "frames".into(),
                metadata: Some(md),
                data: Some(Box::new(InputData::JsonObject {
                    data: serde_json::json!(bytes),
                    data_type: Some(serde_json::json!("UInt8")),
                })),
            },
        }
    }

    #[test]
    fn pads_missing_cameras_and_survives_a_bad_frame() {
        let good: Vec<u8> = (0..2 * 4 * 4 * 3).map(|i| i as u8).collect();
        let events = vec![
            frame_event(0.0, 0, vec![2, 4, 4, 3], good.clone()),
            // wrong byte count for the declared shape: rejected, node keeps running
            frame_event(0.01, 1, vec![2, 4, 4, 3], good[..10].to_vec()),
            frame_event(0.02, 2, vec![2, 4, 4, 3], good.clone()),
        ];
        let (tx, mut rx) = integration_testing::output_channel();
        let (node, stream) = DoraNode::init_testing(
            TestingInput::Input(IntegrationTestInput::new("decode".parse().unwrap(), events)),
            TestingOutput::ToChannel(tx),
            TestingOptions {
                skip_output_time_offsets: true,
            },
        )
        .unwrap();
        let settings = Settings {
            num_images: 3,
            image_size: 4,
        };
        run_with(settings, node, stream).unwrap();
        let out = integration_testing::drain_outputs(&mut rx);
        assert_eq!(
            out.len(),
            2,
            "the bad frame is dropped, the others pass: {out:?}"
        );
        let data: Vec<u64> = out[0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(data.len(), 3 * 4 * 4 * 3);
        assert_eq!(
            &data[..good.len()],
            good.iter()
                .map(|&b| b as u64)
                .collect::<Vec<_>>()
                .as_slice()
        );
        assert!(
            data[good.len()..].iter().all(|&v| v == 0),
            "missing camera is black"
        );
    }

    #[test]
    fn too_many_cameras_is_named() {
        let settings = Settings {
            num_images: 1,
            image_size: 4,
        };
        let mut md = MetadataParameters::new();
        md.insert("encoding".into(), Parameter::String("raw".into()));
        md.insert("shape".into(), Parameter::ListInt(vec![2, 4, 4, 3]));
        let data = dora_node_api::IntoArrow::into_arrow(vec![0u8; 96]);
        let err = decode_frames(&settings, &md, &data)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 cameras") && err.contains("NUM_IMAGES=1"),
            "{err}"
        );
    }
}
