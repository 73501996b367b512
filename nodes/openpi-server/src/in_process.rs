//! The policy inside the server's own process (`POLICY=in-process`): the server's frames go
//! to a thread that owns the model instead of out through the dataflow, so a request pays no
//! dora hop for its images, state and prompt and none for its actions. What the frame runs
//! through is what the `policy` node runs (the same backend, the same observation from the
//! same inputs, the noise of seed `SEED + seq`, the same batching with `MAX_BATCH` and
//! `BATCH_WINDOW_MS`), so a request gets the same actions bit for bit either way.
//!
//! The dataflow path (`POLICY=dataflow`, graphs/serve.yml) keeps the stages swappable and
//! traced by the dataflow; this path is for serving where the round trip counts.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use eyre::{bail, Result, WrapErr};
use node_common::{backend_from_env, batching_from_env, checkpoint_from_env, env_or};
use operators::backend::Runner;
use operators::observation::noise_from_seed;
use operators::{BatchRow, Config, MAX_BATCH};

use crate::{Frame, Hub, Reply};

/// The next frame of `rx`, None once it closes. With a `spin`, the thread keeps looking for
/// one (yielding its core to any thread that wants it) for that long before it sleeps: a
/// frame that comes within it starts at once, where waking a sleeping thread costs tens to
/// hundreds of microseconds (more where idle cores sleep deeply). A client in a closed loop
/// sends its next observation about a millisecond after its last answer; a spin a little
/// longer than that saves the wake-up on every request, for the CPU time of the spin.
fn next_frame(rx: &mpsc::Receiver<Frame>, spin: Duration) -> Option<Frame> {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        loop {
            match rx.try_recv() {
                Ok(f) => return Some(f),
                Err(mpsc::TryRecvError::Disconnected) => return None,
                Err(mpsc::TryRecvError::Empty) if Instant::now() < until => {
                    std::thread::yield_now()
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
    }
    rx.recv().ok()
}

/// Where the server's frames are answered (env `POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyPlace {
    /// Out through the dataflow (`images`, `state`, `tokens`), answered by its `actions`.
    Dataflow,
    /// By a model loaded in this process.
    InProcess,
}

impl PolicyPlace {
    /// `POLICY`: `dataflow` (the default) or `in-process`.
    pub fn from_env() -> Result<Self> {
        match env_or("POLICY", "dataflow".to_string())?.as_str() {
            "dataflow" => Ok(PolicyPlace::Dataflow),
            "in-process" => Ok(PolicyPlace::InProcess),
            other => bail!("env POLICY={other:?}: expected `dataflow` or `in-process`"),
        }
    }
}

/// The model and how frames run on it.
pub struct InProcess {
    runner: Box<dyn Runner>,
    cfg: Config,
    steps: usize,
    seed: u64,
    max_batch: usize,
    window: Duration,
    /// How long the thread looks for the next frame before it sleeps (env `SPIN_US`).
    spin: Duration,
    /// Batches run, by size (index 0 unused).
    sizes: [u64; MAX_BATCH + 1],
}

impl InProcess {
    /// Loads the model of env `CHECKPOINT` on `BACKEND` / `DTYPE`, with `STEPS` (10), `SEED`
    /// (0), `MAX_BATCH` (8) and `BATCH_WINDOW_MS` (0), as the `policy` node reads them, and
    /// `SPIN_US` (0: see [`next_frame`]).
    pub fn from_env() -> Result<Self> {
        let (kind, precision) = backend_from_env()?;
        let steps: usize = env_or("STEPS", 10)?;
        if steps == 0 {
            bail!("env STEPS must be at least 1");
        }
        let seed: u64 = env_or("SEED", 0)?;
        let (max_batch, window) = batching_from_env()?;
        let spin = match node_common::env_opt::<String>("SPIN_US")? {
            Some(v) => node_common::parse_spin_us(&v).map_err(|e| eyre::eyre!(e))?,
            None => Duration::ZERO,
        };
        let ckpt = checkpoint_from_env()?;
        let mut runner = operators::backend::load(kind, precision, &ckpt, |_, _| {})
            .wrap_err("POLICY=in-process: loading the policy")?;
        // Graphs for a one-token prompt now; other prompt lengths build theirs when they
        // first arrive (as the policy node does).
        runner.prepare(steps, 1)?;
        Ok(InProcess {
            runner,
            cfg: ckpt.config.clone(),
            steps,
            seed,
            max_batch,
            window,
            spin,
            sizes: [0; MAX_BATCH + 1],
        })
    }

    /// e.g. "cuda bf16 on NVIDIA H200".
    pub fn describe(&self) -> String {
        self.runner.describe()
    }

    /// Answers the frames of `rx` until it closes: the frames waiting together (up to
    /// `MAX_BATCH`; with a window, those arriving within it of the first) run as one batch,
    /// and each request gets its own actions or its own error. Returns the summary's tail,
    /// e.g. ", batches: 40 of 1, 3 of 2".
    pub fn serve(mut self, rx: mpsc::Receiver<Frame>, hub: Arc<Hub>) -> String {
        while let Some(first) = next_frame(&rx, self.spin) {
            let opened = Instant::now();
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                let left = self.window.saturating_sub(opened.elapsed());
                let next = if left.is_zero() {
                    rx.try_recv().ok()
                } else {
                    rx.recv_timeout(left).ok()
                };
                match next {
                    Some(f) => batch.push(f),
                    None => break,
                }
            }
            self.run(batch, &hub);
        }
        node_common::batches_summary(&self.sizes)
            .map(|b| format!(", {b}"))
            .unwrap_or_default()
    }

    fn run(&mut self, batch: Vec<Frame>, hub: &Hub) {
        let n = batch.len();
        let (seqs, inputs): (Vec<u64>, Vec<_>) = batch
            .into_iter()
            .map(|f| {
                let noise = noise_from_seed(&self.cfg, self.seed.wrapping_add(f.seq));
                (f.seq, (f.input.observation(), noise))
            })
            .unzip();
        let rows: Vec<BatchRow> = inputs
            .iter()
            .map(|(obs, noise)| BatchRow { obs, noise })
            .collect();
        let refused = |seq: u64, e: &dyn std::fmt::Display| {
            format!("the policy rejected this observation (frame {seq}, in-process policy): {e}")
        };
        let started = std::time::Instant::now();
        let ran = self.runner.infer_batch(&rows, self.steps);
        let wall_ms = started.elapsed().as_secs_f64() * 1e3;
        match ran {
            Ok(out) => {
                if let Some(count) = self.sizes.get_mut(n) {
                    *count += 1;
                }
                let t = out.times;
                let policy_ms = (t.vision + t.prefix + t.denoise).as_secs_f64() * 1e3;
                for (seq, actions) in seqs.into_iter().zip(out.actions) {
                    let reply = actions
                        .map(|actions| Reply {
                            actions,
                            policy_ms: Some(policy_ms),
                            wall_ms: Some(wall_ms),
                            batch_size: Some(n as i64),
                        })
                        .map_err(|e| refused(seq, &e));
                    hub.complete(seq, reply);
                }
            }
            Err(e) => {
                for seq in seqs {
                    hub.complete(seq, Err(refused(seq, &e)));
                }
            }
        }
    }
}
