//! Camera decode: JPEG / PNG / raw RGB frames of every camera to one u8 tensor
//! [num_images, image_size, image_size, 3] (openpi's resize with padding); cameras the robot
//! lacks are filled with black and masked out (`image_masks` metadata). With `ENCODE` set it
//! sends the resized cameras on as a `frames` message instead (raw, or one JPEG per camera),
//! for a decode node on another machine to finish: the robot's half of a two-machine graph.

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraArray, DoraNode, Event, EventStream, MetadataParameters, Parameter};
use eyre::{bail, eyre, Result};
use node_common::{env_opt, env_or, list_param, report_rejected, str_param, FrameMeta, SeqGaps};
use operators::decode::{decode_rgb, encode_jpeg, resize_with_pad_u8, Encoding};

/// What the node sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    /// The model's input tensor on `images` (the default).
    Images,
    /// The resized cameras as raw RGB `frames` (`encoding="raw"`).
    Raw,
    /// The resized cameras as one JPEG each, `frames` with `encoding="encoded"`.
    Jpeg { quality: u8 },
}

impl Send {
    /// The output it sends on.
    pub fn output(self) -> &'static str {
        match self {
            Send::Images => "images",
            Send::Raw | Send::Jpeg { .. } => "frames",
        }
    }
}

pub struct Settings {
    pub num_images: usize,
    pub image_size: usize,
    pub send: Send,
}

/// `ENCODE`'s values.
pub const ENCODINGS: &[&str] = &["none", "raw", "jpeg"];

impl Settings {
    /// Env: `NUM_IMAGES` (3), `IMAGE_SIZE` (224), `ENCODE` (`none`: the model's tensor;
    /// `raw` or `jpeg`: frames for another decode node), `JPEG_QUALITY` (90, with `jpeg`).
    pub fn from_env() -> Result<Self> {
        let encode = env_opt::<String>("ENCODE")?.unwrap_or_else(|| "none".into());
        let encode = operators::settings::parse_choice("ENCODE", &encode, ENCODINGS)?;
        let quality: u8 = env_or("JPEG_QUALITY", 90)?;
        let send = parse_send(encode, quality)?;
        let s = Settings {
            num_images: env_or("NUM_IMAGES", 3)?,
            image_size: env_or("IMAGE_SIZE", 224)?,
            send,
        };
        if s.num_images == 0 || s.image_size == 0 {
            bail!("env NUM_IMAGES and IMAGE_SIZE must be positive");
        }
        Ok(s)
    }
}

/// `ENCODE` and `JPEG_QUALITY` as a [`Send`].
pub fn parse_send(encode: &str, quality: u8) -> Result<Send> {
    if !(1..=100).contains(&quality) {
        bail!("env JPEG_QUALITY={quality} must be between 1 and 100");
    }
    Ok(match encode {
        "none" => Send::Images,
        "raw" => Send::Raw,
        "jpeg" => Send::Jpeg { quality },
        other => bail!(
            "env ENCODE={other:?} must be one of {}",
            ENCODINGS.join(", ")
        ),
    })
}

/// Decodes one `frames` message into (images, masks).
pub fn decode_frames(
    settings: &Settings,
    md: &MetadataParameters,
    data: &DoraArray,
) -> Result<(Vec<u8>, Vec<bool>)> {
    let cams = decode_cameras(settings, md, data)?;
    let s = settings.image_size;
    let masks: Vec<bool> = (0..settings.num_images).map(|i| i < cams.len()).collect();
    let mut images = cams.concat();
    images.resize(settings.num_images * s * s * 3, 0);
    Ok((images, masks))
}

/// Decodes one `frames` message into its cameras, each resized with padding to
/// `image_size` (at most `num_images` of them).
pub fn decode_cameras(
    settings: &Settings,
    md: &MetadataParameters,
    data: &DoraArray,
) -> Result<Vec<Vec<u8>>> {
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
    Ok(cams)
}

/// The resized cameras as a `frames` message of `send` (raw or JPEG): (metadata, bytes).
pub fn encode_frames(
    send: Send,
    size: usize,
    meta: FrameMeta,
    cams: &[Vec<u8>],
) -> Result<(MetadataParameters, Vec<u8>)> {
    let mut p = meta.params();
    p.insert("dtype".into(), Parameter::String("uint8".into()));
    let data = match send {
        Send::Images => bail!("encode_frames: the images tensor is not a frames message"),
        Send::Raw => {
            p.insert("encoding".into(), Parameter::String("raw".into()));
            p.insert(
                "shape".into(),
                Parameter::ListInt(vec![cams.len() as i64, size as i64, size as i64, 3]),
            );
            cams.concat()
        }
        Send::Jpeg { quality } => {
            let mut data = Vec::new();
            let mut offsets = vec![0i64];
            for (i, cam) in cams.iter().enumerate() {
                data.extend(
                    encode_jpeg(cam, size, size, quality).map_err(|e| eyre!("camera {i}: {e}"))?,
                );
                offsets.push(data.len() as i64);
            }
            p.insert("encoding".into(), Parameter::String("encoded".into()));
            p.insert("offsets".into(), Parameter::ListInt(offsets));
            data
        }
    };
    Ok((p, data))
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    run_with(Settings::from_env()?, node, events)
}

pub fn run_with(settings: Settings, mut node: DoraNode, mut events: EventStream) -> Result<()> {
    let out: DataId = settings.send.output().to_string().into();
    // A send on an undeclared output is dropped with one warning; refuse to start instead.
    // (The testing harness declares no outputs and takes any.)
    let declared = &node.node_config().outputs;
    if !declared.is_empty() && !declared.contains(&out) {
        bail!(
            "ENCODE={} sends on output `{out}`, which the dataflow does not declare for this node",
            match settings.send {
                Send::Images => "none",
                Send::Raw => "raw",
                Send::Jpeg { .. } => "jpeg",
            }
        );
    }
    let tracer = node_common::tracer(&node, "cpu")?;
    let mut gaps = SeqGaps::default();
    // Bytes sent on `frames` (a robot-side decode), for the summary.
    let mut sent_bytes = 0usize;
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
                let s = settings.image_size;
                let (p, bytes) = if settings.send == Send::Images {
                    let (images, masks) = decode_frames(&settings, md, &data)?;
                    let mut p = meta.tensor_params(&[settings.num_images, s, s, 3], "uint8");
                    p.insert(
                        "image_masks".into(),
                        Parameter::ListInt(masks.iter().map(|&m| m as i64).collect()),
                    );
                    (p, images)
                } else {
                    let cams = decode_cameras(&settings, md, &data)?;
                    encode_frames(settings.send, s, meta, &cams)?
                };
                if settings.send != Send::Images {
                    sent_bytes += bytes.len();
                }
                node.send_output(out.clone(), p, bytes)
                    .map_err(|e| eyre!("sending {out}: {e}"))?;
                span.end();
                Ok(())
            });
            if let Err(e) = result {
                report_rejected(node.id().as_ref(), &e);
            }
        }
    }
    // Named after the node: a two-machine graph runs two decode nodes.
    let sent = match settings.send {
        Send::Images => String::new(),
        send => format!(
            ", sent {:.2} MB of {} frames ({:.1} kB a frame)",
            sent_bytes as f64 / 1e6,
            if send == Send::Raw { "raw" } else { "JPEG" },
            sent_bytes as f64 / 1e3 / gaps.frames.max(1) as f64
        ),
    };
    eprintln!(
        "{}: {} frames, {} gaps{sent}",
        node.id(),
        gaps.frames,
        gaps.gaps
    );
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
            send: Send::Images,
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
            send: Send::Images,
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

    /// A robot-side decode (`ENCODE: raw` or `jpeg`) sends the real cameras resized as a
    /// `frames` message; a second decode turns that into the same tensor a one-machine
    /// decode makes (exactly for raw, within JPEG's error for jpeg).
    #[test]
    fn encoded_frames_decode_to_the_same_images() {
        let (h, w) = (6usize, 8usize);
        let cams: Vec<u8> = (0..2 * h * w * 3).map(|i| (i * 5 % 256) as u8).collect();
        let mut md = MetadataParameters::new();
        md.insert("encoding".into(), Parameter::String("raw".into()));
        md.insert(
            "shape".into(),
            Parameter::ListInt(vec![2, h as i64, w as i64, 3]),
        );
        let data = dora_node_api::IntoArrow::into_arrow(cams.clone());
        let local = Settings {
            num_images: 3,
            image_size: 8,
            send: Send::Images,
        };
        let (want, masks) = decode_frames(&local, &md, &data).unwrap();
        assert_eq!(masks, [true, true, false]);
        let meta = FrameMeta {
            seq: 4,
            t_capture_ns: 9,
            trace: None,
        };
        for (send, exact) in [(Send::Raw, true), (Send::Jpeg { quality: 95 }, false)] {
            let robot = Settings { send, ..local };
            let resized = decode_cameras(&robot, &md, &data).unwrap();
            let (p, bytes) = encode_frames(send, 8, meta, &resized).unwrap();
            assert_eq!(node_common::int_param(&p, "seq"), Some(4));
            let arrow = dora_node_api::IntoArrow::into_arrow(bytes.clone());
            let (got, masks) = decode_frames(&local, &p, &arrow).unwrap();
            assert_eq!(masks, [true, true, false], "{send:?}");
            if exact {
                assert_eq!(got, want);
                assert_eq!(bytes.len(), 2 * 8 * 8 * 3);
            } else {
                let worst = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max();
                assert!(worst.is_some_and(|d| d < 48), "{worst:?}");
                assert!(got[2 * 8 * 8 * 3..].iter().all(|&v| v == 0));
            }
        }
        assert!(encode_frames(Send::Images, 8, meta, &[]).is_err());
        let err = parse_send("jpeg", 0).unwrap_err().to_string();
        assert!(err.contains("JPEG_QUALITY=0"), "{err}");
        assert_eq!(parse_send("jpeg", 70).unwrap(), Send::Jpeg { quality: 70 });
    }
}
