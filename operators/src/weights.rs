//! Pulls tensors out of a checkpoint as f32 by key and reports progress in bytes read.

use crate::checkpoint::Checkpoint;
use crate::cpu::Linear;
use crate::Result;

/// Reads tensors and calls `progress(bytes_done, bytes_total)` after each one.
pub struct Loader<'a> {
    done: u64,
    total: u64,
    progress: Box<dyn FnMut(u64, u64) + 'a>,
}

impl<'a> Loader<'a> {
    pub fn new(ckpt: &Checkpoint, progress: impl FnMut(u64, u64) + 'a) -> Self {
        Loader {
            done: 0,
            total: ckpt.policy_bytes(),
            progress: Box::new(progress),
        }
    }

    pub fn tensor(&mut self, ckpt: &Checkpoint, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = ckpt.read_f32(key, shape)?;
        if let Some(info) = ckpt.info(key) {
            self.done += (info.data_offsets.1 - info.data_offsets.0) as u64;
        }
        (self.progress)(self.done, self.total);
        Ok(v)
    }

    /// `key.weight` [n_out, n_in] and, when `bias`, `key.bias` [n_out].
    pub fn linear(
        &mut self,
        ckpt: &Checkpoint,
        key: &str,
        n_out: usize,
        n_in: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = self.tensor(ckpt, &format!("{key}.weight"), &[n_out, n_in])?;
        let bias = if bias {
            Some(self.tensor(ckpt, &format!("{key}.bias"), &[n_out])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            n_in,
            n_out,
            fp8: None,
        })
    }
}
