//! `turbopi`: run pi0 / pi0.5 on an observation, make random-weight checkpoints, inspect
//! checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

mod accuracy;
mod bench;
mod kernels;
mod openpi;
mod serve;
mod spans;
mod tokenize;

use turbopi::{graph, plan, trace};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use operators::backend::{self, BackendKind, Precision};
use operators::checkpoint::{tensor_specs, Checkpoint, Part, WriteDtype};
use operators::config::{Schema, PRESETS};
use operators::observation::{noise_from_seed, write_sample};
use operators::random::write_random_checkpoint;
use operators::{npy, Config, Observation};

#[derive(Parser)]
#[command(
    name = "turbopi",
    version,
    about = "Real-time pi0 / pi0.5 policies from Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the policy on one observation directory and write the actions as .npy.
    Infer {
        /// Checkpoint directory (model.safetensors + config.json).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Observation directory (images.npy, image_masks.npy, tokens.npy, token_mask.npy, ...).
        #[arg(long, required_unless_present = "openpi", conflicts_with = "openpi")]
        observation: Option<PathBuf>,
        #[command(flatten)]
        openpi: openpi::OpenpiArgs,
        /// Euler steps of the flow-matching sampler.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Seed of the noise when the observation has no noise.npy.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output file, f32 [action_horizon, action_dim].
        #[arg(long)]
        out: PathBuf,
        /// cpu (f32 reference) or cuda (needs a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Arithmetic: f32, bf16 (cuda only) or fp8 (cuda: FP8 tensor cores, sm_89+; cpu:
        /// emulated). Defaults to f32 on cpu and bf16 on cuda.
        #[arg(long)]
        dtype: Option<String>,
        #[command(flatten)]
        trace: spans::TraceArgs,
    },
    /// Make or inspect checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Latency of the policy on a named workload (random weights unless --checkpoint).
    Bench {
        /// Load this checkpoint instead of random weights.
        #[arg(long, conflicts_with = "preset")]
        checkpoint: Option<PathBuf>,
        /// Random weights of this preset (pi0, pi05, pi0-small, pi05-small); default: the
        /// setting's full-size model.
        #[arg(long)]
        preset: Option<String>,
        /// libero (pi0.5, 2 + 1 masked cameras, 20 of 200 tokens, horizon 10) or pi0 (3
        /// cameras, 48 tokens, horizon 50).
        #[arg(long, default_value = "libero")]
        setting: String,
        /// Real prompt tokens instead of the setting's (1 to the model's max_token_len), e.g.
        /// the length of the prompts a server sees.
        #[arg(long)]
        prompt_tokens: Option<usize>,
        #[arg(long, default_value = "cuda")]
        backend: String,
        /// f32, bf16 (cuda) or fp8 (cuda: sm_89+; cpu: emulated); default bf16 on cuda, f32 on
        /// cpu.
        #[arg(long)]
        dtype: Option<String>,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 100)]
        iters: usize,
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also time batches of these sizes (comma-separated, each 1 to 8; e.g. 1,2,4):
        /// per-frame latency and frames/s of the backend's batched forward.
        #[arg(long, value_delimiter = ',')]
        batch: Vec<usize>,
        /// Also time frames guided by real-time chunking (leftover: the unguided chunk's
        /// second half, delay 3, beta 5): exact VJP on cpu, the Jacobian term dropped on cuda.
        #[arg(long)]
        rtc: bool,
        #[command(flatten)]
        trace: spans::TraceArgs,
    },
    /// Compare the actions of one checkpoint in two precisions (fp8 against f32 by default)
    /// over the same observations and noise: cosine and largest difference per chunk.
    Accuracy(accuracy::AccuracyArgs),
    /// Check dora dataflow graphs.
    #[command(subcommand)]
    Graph(GraphCommand),
    /// Read per-stage trace files (TRACE_FILE of the nodes).
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// The CUDA kernels: compile them for named architectures without a GPU.
    #[command(subcommand)]
    Kernels(kernels::KernelsCommand),
    /// A prompt through openpi's PaliGemma tokenizer (tokenizer.json or SentencePiece .model):
    /// prints the ids, mask and pieces as JSON.
    Tokenize(tokenize::TokenizeArgs),
    /// Serve a checkpoint to openpi clients (openpi's websocket protocol) with the serving
    /// dataflow under `dora run`, until Ctrl-C or SIGTERM.
    Serve(serve::ServeArgs),
}

#[derive(Subcommand)]
enum GraphCommand {
    /// Validate a dataflow: sources, stage input kinds, cycles, checkpoints, env values.
    Check { file: PathBuf },
    /// Where each stage runs (node, machine, backend, GPU stream priority by the critical
    /// path) and how each edge moves its tensors (in-process, CUDA IPC, host) with bytes per
    /// frame and ring sizes; a table, then Graphviz DOT (or DOT to --dot FILE).
    Plan {
        file: PathBuf,
        #[arg(long)]
        dot: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Write a random-weight checkpoint in openpi's layout plus a sample observation
    /// (DIR/observation).
    Random {
        /// One of: pi0, pi05, pi0-small, pi05-small, pi0-dummy, pi05-dummy (openpi's test
        /// model: tiny Gemmas, the full SigLIP).
        #[arg(long, required_unless_present = "setting", conflicts_with = "setting")]
        preset: Option<String>,
        /// Instead of a preset, the model of a `turbopi bench` setting: libero (pi0.5 with
        /// openpi's LIBERO action horizon, 10) or pi0, so that a served checkpoint runs what
        /// `turbopi bench --setting` times.
        #[arg(long)]
        setting: Option<String>,
        #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
        dtype: DtypeArg,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// config.json in turbo-pi's schema, or in openpi's as its converter writes it
        /// (variant names; pi0, pi05 and the -dummy presets only).
        #[arg(long, value_enum, default_value_t = SchemaArg::TurboPi)]
        config_schema: SchemaArg,
    },
    /// Print the config, parameter counts per part and dtype mix, and validate every tensor.
    Inspect { dir: PathBuf },
    /// Print a preset's config.json.
    Config {
        #[arg(long)]
        preset: String,
        #[arg(long, value_enum, default_value_t = SchemaArg::TurboPi)]
        config_schema: SchemaArg,
    },
}

/// The two schemas of config.json.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SchemaArg {
    #[value(name = "turbo-pi")]
    TurboPi,
    Openpi,
}

impl SchemaArg {
    fn render(self, cfg: &Config, dtype: DtypeArg) -> Result<String> {
        Ok(match self {
            SchemaArg::TurboPi => cfg.to_json_pretty() + "\n",
            SchemaArg::Openpi => cfg.to_openpi_json(match dtype {
                DtypeArg::F32 => "float32",
                DtypeArg::Bf16 => "bfloat16",
            })?,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Infer {
            checkpoint,
            observation,
            openpi,
            steps,
            seed,
            out,
            backend,
            dtype,
            trace,
        } => infer(
            &checkpoint,
            observation.as_deref(),
            steps,
            seed,
            &out,
            &backend,
            dtype.as_deref(),
            &trace,
            &openpi,
        ),
        Command::Checkpoint(CheckpointCommand::Random {
            preset,
            setting,
            dtype,
            seed,
            out,
            config_schema,
        }) => random_model(preset.as_deref(), setting.as_deref())
            .and_then(|model| random(model, dtype, seed, &out, config_schema)),
        Command::Checkpoint(CheckpointCommand::Inspect { dir }) => inspect(&dir),
        Command::Graph(GraphCommand::Check { file }) => graph_check(&file),
        Command::Graph(GraphCommand::Plan { file, dot }) => graph_plan(&file, dot.as_deref()),
        Command::Trace(cmd) => trace::run(cmd),
        Command::Kernels(cmd) => kernels::run(cmd),
        Command::Serve(args) => serve::run(&args),
        Command::Tokenize(args) => tokenize::run(&args),
        Command::Accuracy(args) => accuracy::run(&args),
        Command::Bench {
            checkpoint,
            preset,
            setting,
            prompt_tokens,
            backend,
            dtype,
            steps,
            iters,
            warmup,
            seed,
            batch,
            rtc,
            trace,
        } => trace
            .config()
            .and_then(|trace| {
                bench::run(&bench::BenchArgs {
                    setting,
                    backend,
                    dtype,
                    checkpoint,
                    preset,
                    prompt_tokens,
                    steps,
                    iters,
                    warmup,
                    seed,
                    batch,
                    rtc,
                    trace,
                })
            })
            .map(|_| ()),
        Command::Checkpoint(CheckpointCommand::Config {
            preset,
            config_schema,
        }) => Config::preset(&preset)
            .map_err(Into::into)
            .and_then(|c| config_schema.render(&c, DtypeArg::Bf16))
            .map(|text| print!("{text}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn open_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(dir)
        .with_context(|| format!("cannot open checkpoint {}", dir.display()))?;
    for field in &ckpt.unknown_config_fields {
        eprintln!(
            "warning: {}: unknown field `{field}` ignored",
            ckpt.dir.join("config.json").display()
        );
    }
    Ok(ckpt)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Backend and precision from the CLI's strings (precision defaults per backend).
fn backend_choice(backend: &str, dtype: Option<&str>) -> Result<(BackendKind, Precision)> {
    let kind: BackendKind = backend.parse()?;
    let precision = match (dtype, kind) {
        (Some(d), _) => d.parse()?,
        (None, BackendKind::Cpu) => Precision::F32,
        (None, BackendKind::Cuda) => Precision::Bf16,
    };
    Ok((kind, precision))
}

// One argument per flag of `turbopi infer`.
#[allow(clippy::too_many_arguments)]
fn infer(
    checkpoint: &Path,
    observation: Option<&Path>,
    steps: usize,
    seed: u64,
    out: &Path,
    backend: &str,
    dtype: Option<&str>,
    trace: &spans::TraceArgs,
    openpi: &openpi::OpenpiArgs,
) -> Result<()> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let trace = trace.config()?;
    let (kind, precision) = backend_choice(backend, dtype)?;
    let t_load = Instant::now();
    let ckpt = open_checkpoint(checkpoint)?;
    let cfg = ckpt.config.clone();
    let bar = bytes_bar(ckpt.policy_bytes(), "loading weights");
    eprintln!(
        "loading {} ({:.1} GB) ...",
        ckpt.weights_path.display(),
        ckpt.policy_bytes() as f64 / 1e9
    );
    let mut policy = backend::load(kind, precision, &ckpt, |done, _| bar.set_position(done))
        .with_context(|| format!("cannot load weights from {}", ckpt.weights_path.display()))?;
    bar.finish_and_clear();
    let load = t_load.elapsed();
    let frame = openpi.load(checkpoint, &cfg)?;
    let obs = match (&frame, observation) {
        (Some(f), _) => f.observation.clone(),
        (None, Some(dir)) => Observation::load(dir, &cfg)
            .with_context(|| format!("bad observation {}", dir.display()))?,
        (None, None) => bail!("--observation DIR or --openpi FILE is required"),
    };
    let noise = match &obs.noise {
        Some(n) => n.clone(),
        None => noise_from_seed(&cfg, seed),
    };
    eprintln!("running {} ...", policy.describe());
    let tracer = spans::tracer(&trace, &policy.describe())?;
    let t0 = Instant::now();
    let (actions, times) = policy.infer(&obs, &noise, steps)?;
    let total = t0.elapsed();
    tracer.record_stages(
        0,
        None,
        &times,
        SystemTime::now(),
        kind == BackendKind::Cuda,
    );
    if let Some(bad) = actions.iter().position(|v| !v.is_finite()) {
        bail!("the policy produced a non-finite action at index {bad}");
    }
    let written = match &frame {
        Some(f) => {
            let [h, d] = f.write_actions(out, &actions)?;
            format!("f64 [{h}, {d}] (the robot's actions)")
        }
        None => {
            npy::write_f32(out, &[cfg.action_horizon, cfg.action_dim], &actions)?;
            format!("f32 [{}, {}]", cfg.action_horizon, cfg.action_dim)
        }
    };
    println!("load      {:10.1} ms", ms(load));
    println!("vision    {:10.1} ms", ms(times.vision));
    println!("prefix    {:10.1} ms", ms(times.prefix));
    println!("denoise   {:10.1} ms  ({steps} steps)", ms(times.denoise));
    println!("total     {:10.1} ms", ms(total));
    println!("wrote {} {written}", out.display());
    Ok(())
}

fn graph_plan(file: &Path, dot: Option<&Path>) -> Result<()> {
    let plan = plan::plan(file)?;
    println!("{}: plan\n", file.display());
    print!("{}", plan.table());
    match dot {
        Some(path) => {
            std::fs::write(path, plan.dot())
                .with_context(|| format!("writing {}", path.display()))?;
            println!("\nDOT written to {}", path.display());
        }
        None => print!("\n{}", plan.dot()),
    }
    if plan.errors.is_empty() {
        return Ok(());
    }
    for e in &plan.errors {
        eprintln!("{}: {e}", file.display());
    }
    bail!(
        "{}: {} problem(s) in the plan",
        file.display(),
        plan.errors.len()
    )
}

fn graph_check(file: &Path) -> Result<()> {
    let mut report = graph::check(file)?;
    graph::check_consistency(file, &mut report)?;
    if report.errors.is_empty() {
        println!(
            "{}: ok ({} nodes, {} edges)",
            file.display(),
            report.nodes,
            report.edges
        );
        return Ok(());
    }
    for e in &report.errors {
        eprintln!("{}: {e}", file.display());
    }
    bail!("{}: {} problem(s)", file.display(), report.errors.len())
}

/// The config of `checkpoint random`'s `--preset` or `--setting` (exactly one), and how to
/// name it.
fn random_model(preset: Option<&str>, setting: Option<&str>) -> Result<(Config, String)> {
    match (preset, setting) {
        (Some(p), None) => Ok((Config::preset(p)?, format!("preset {p}"))),
        (None, Some(s)) => {
            let setting: operators::bench::Setting = s.parse()?;
            Ok((setting.config(), format!("setting {s}")))
        }
        _ => bail!("give one of --preset and --setting"),
    }
}

fn random(
    (cfg, preset): (Config, String),
    dtype: DtypeArg,
    seed: u64,
    out: &Path,
    schema: SchemaArg,
) -> Result<()> {
    // Before any weights are written: a preset openpi's schema cannot express fails here.
    let config_json = schema.render(&cfg, dtype).with_context(|| {
        format!(
            "{preset} in the {} schema",
            match schema {
                SchemaArg::TurboPi => "turbo-pi",
                SchemaArg::Openpi => "openpi",
            }
        )
    })?;
    let dtype = match dtype {
        DtypeArg::F32 => WriteDtype::F32,
        DtypeArg::Bf16 => WriteDtype::Bf16,
    };
    let total: u64 = tensor_specs(&cfg)
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "writing weights [{bar:40}] {human_pos}/{human_len} params ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    write_random_checkpoint(out, &cfg, dtype, seed, |done, _| bar.set_position(done))
        .with_context(|| format!("cannot write checkpoint to {}", out.display()))?;
    bar.finish_and_clear();
    if schema == SchemaArg::Openpi {
        let path = out.join("config.json");
        std::fs::write(&path, config_json)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let obs_dir = out.join("observation");
    write_sample(&obs_dir, &cfg, seed)?;
    println!(
        "wrote {} ({} parameters, {preset}) and a sample observation in {}",
        out.display(),
        total,
        obs_dir.display()
    );
    Ok(())
}

fn inspect(dir: &Path) -> Result<()> {
    let ckpt = open_checkpoint(dir)?;
    let cfg = &ckpt.config;
    println!("checkpoint {}", dir.display());
    println!(
        "model      {}  (presets: {})",
        if cfg.pi05 { "pi0.5" } else { "pi0" },
        PRESETS.join(", ")
    );
    println!("schema     {}", ckpt.config_schema);
    if let Schema::Openpi(read) = &ckpt.config_schema {
        if let Some(key) = &read.pi05_from_weights {
            println!("           pi05 = {} from model.safetensors (`{key}`; openpi's converter does not write it)", cfg.pi05);
        }
        if read.max_token_len_default {
            println!(
                "           max_token_len = {} (openpi's default for {})",
                cfg.max_token_len,
                if cfg.pi05 { "pi0.5" } else { "pi0" }
            );
        }
        if let Some(d) = read.discrete_state_input {
            println!(
                "           discrete_state_input = {d} (`turbopi serve` passes it to the server)"
            );
        }
        if !read.turbopi_fields.is_empty() {
            println!(
                "           turbo-pi fields, all agreeing: {}",
                read.turbopi_fields.join(", ")
            );
        }
    }
    println!("dimensions (turbo-pi's fields):\n{}", cfg.to_json_pretty());
    let specs = tensor_specs(cfg);
    let mut per_part: BTreeMap<Part, u64> = BTreeMap::new();
    let mut used = std::collections::BTreeSet::new();
    for s in &specs {
        if let Some(info) = ckpt.info(&s.key) {
            *per_part.entry(s.part).or_default() += info.shape.iter().product::<usize>() as u64;
            used.insert(s.key.clone());
        }
    }
    println!("\nparameters per part:");
    let mut sum = 0;
    for (part, n) in &per_part {
        println!("  {:<20} {:>15}", part.name(), n);
        sum += n;
    }
    println!("  {:<20} {:>15}", "total", sum);
    let mut dtypes: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut extra = Vec::new();
    for (key, info) in ckpt.tensor_infos() {
        let e = dtypes.entry(format!("{:?}", info.dtype)).or_default();
        e.0 += 1;
        e.1 += info.shape.iter().product::<usize>() as u64;
        let alias = key == operators::checkpoint::EMBED_ALIAS;
        if !used.contains(key) && !alias {
            extra.push(key.to_string());
        }
    }
    println!("\ndtype mix (all tensors in the file):");
    for (d, (count, params)) in &dtypes {
        println!("  {d:<6} {count:>6} tensors {params:>15} params");
    }
    let optional_missing: Vec<_> = specs
        .iter()
        .filter(|s| s.optional && ckpt.info(&s.key).is_none())
        .map(|s| s.key.as_str())
        .collect();
    println!(
        "\nvalid: all {} tensors the policy reads are present with the expected shapes",
        specs.len() - optional_missing.len()
    );
    for k in optional_missing {
        println!("  (optional, absent: {k})");
    }
    if !extra.is_empty() {
        println!(
            "{} tensors in the file are not read by the policy:",
            extra.len()
        );
        for k in extra.iter().take(10) {
            println!("  {k}");
        }
        if extra.len() > 10 {
            println!("  ...");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_checkpoints_take_a_preset_or_a_bench_setting() {
        let (cfg, name) = random_model(None, Some("libero")).unwrap();
        assert!(cfg.pi05);
        assert_eq!(cfg.action_horizon, 10, "openpi's LIBERO horizon");
        assert_eq!(name, "setting libero");
        // openpi's schema carries the horizon (its pi05_libero config).
        let json = SchemaArg::Openpi.render(&cfg, DtypeArg::Bf16).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["action_horizon"], 10, "{json}");
        let (preset, _) = random_model(Some("pi05"), None).unwrap();
        assert_eq!(preset.action_horizon, 50);
        let (pi0, _) = random_model(None, Some("pi0")).unwrap();
        assert!(!pi0.pi05);
        let e = random_model(None, Some("droid")).unwrap_err().to_string();
        assert!(e.contains("unknown bench setting `droid`"), "{e}");
        let e = random_model(Some("pi05"), Some("libero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("one of --preset and --setting"), "{e}");
        // clap refuses both, and neither, before any weights are written.
        let both = [
            "turbopi",
            "checkpoint",
            "random",
            "--preset",
            "pi05",
            "--setting",
            "libero",
            "--out",
            "x",
        ];
        assert!(Cli::try_parse_from(both).is_err());
        let neither = ["turbopi", "checkpoint", "random", "--out", "x"];
        assert!(Cli::try_parse_from(neither).is_err());
    }
}
