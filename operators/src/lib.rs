//! turbo-pi operators: the model's configuration, checkpoint loading, the f32 CPU reference
//! backend and the stage operators (vision, prefix, denoise) of pi0 and pi0.5.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode;
pub mod error;
pub mod fsio;
pub mod gemma;
pub mod image;
pub mod keys;
pub mod norm_stats;
pub mod npy;
pub mod observation;
pub mod openpi;
pub mod policy;
pub mod postprocess;
pub mod random;
pub mod ring;
pub mod rtc;
pub mod settings;
pub mod siglip;
pub mod vjp;
pub mod weights;

pub use config::Config;
pub use error::{Error, Result};
pub use observation::{Observation, Pixels};
pub use policy::{
    BatchOutput, BatchRow, Denoiser, ImageEmbeddings, Policy, PrefixEncoder, StageTimes,
    VisionEncoder, MAX_BATCH,
};
