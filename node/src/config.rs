//! Node configuration: the environment contract of DESIGN.md, each also a flag.

use std::path::PathBuf;

use drover_shared::family::ModelFamily;

/// Which kind of workers the factory creates.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Pick cuda if a CUDA device is usable, else rknn for `.rknn` models, else cpu.
    Auto,
    /// Burn on an NVIDIA GPU.
    Cuda,
    /// Rockchip RK3588 NPU.
    Rknn,
    /// Burn on the CPU.
    Cpu,
    /// A simulation for scheduler tests and load benchmarks: no model, deterministic images.
    Sim,
}

impl BackendKind {
    /// The backend's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cuda => "cuda",
            Self::Rknn => "rknn",
            Self::Cpu => "cpu",
            Self::Sim => "sim",
        }
    }
}

/// The dtype a Burn pipeline's text encoders and UNet store and compute in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionKind {
    /// 32-bit floats (the CPU default).
    F32,
    /// IEEE half precision (the cuda default).
    F16,
    /// bfloat16 (f32's range, 8 significant bits).
    Bf16,
}

/// The `drover-node` command line: run a node (no subcommand) or a tool.
#[derive(clap::Parser, Debug)]
#[command(
    name = "drover-node",
    version,
    about = "Drover node: runs image workers for a coordinator",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A tool to run instead of the node.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Node settings.
    #[command(flatten)]
    pub node: NodeConfig,
}

/// Tools of `drover-node`.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Tell what a model file or folder is, from its safetensors headers alone.
    Inspect {
        /// A .safetensors file, a diffusers folder, or a folder holding one model.
        path: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a demo model: SD1.5- or SDXL-shaped (their text widths and conditioning), LCM or
    /// standard, small, random weights (draws noise).
    MakeModel {
        /// Folder to write (a diffusers layout).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// `sd15` or `sdxl`.
        #[arg(long, default_value = "sd15")]
        family: ModelFamily,
        /// `lcm` (a guidance embedding; the lcm sampler, 1..=8 steps), `standard` (no guidance
        /// embedding; Euler, DPM++ 2M, ... with classifier-free guidance) or `inpaint` (standard,
        /// with a 9-channel inpainting UNet).
        #[arg(long, default_value = "lcm", value_parser = ["lcm", "standard", "inpaint"])]
        variant: String,
        /// Write a random-weight upscaler instead, of this scale (`x1`, `x2`, `x4`): `--out`
        /// a `.safetensors` file, or a folder (it gets `model.safetensors`).
        #[arg(long, value_parser = ["x1", "x2", "x4"])]
        upscaler: Option<String>,
        /// The upscaler's network: `compact` (Real-ESRGAN's SRVGGNet, realesr-general's shape)
        /// or `rrdb` (Real-ESRGAN's RRDBNet, RealESRGAN_x4plus's shape).
        #[arg(long, default_value = "compact", value_parser = ["compact", "rrdb"], requires = "upscaler")]
        arch: String,
        /// Upscaler feature channels (default 64, as released).
        #[arg(long, requires = "upscaler")]
        features: Option<usize>,
        /// Upscaler depth: body convolutions (compact, default 32) or RRDB blocks (rrdb, 23).
        #[arg(long, requires = "upscaler")]
        depth: Option<usize>,
    },
    /// Upscale one image with a super-resolution file, without a coordinator, and print how
    /// long it took (JSON).
    Upscale {
        /// The upscaler (.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Image to upscale (PNG or JPEG).
        #[arg(long)]
        image: PathBuf,
        /// PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// Passes (default: the fewest that reach `--scale`, else 1).
        #[arg(long)]
        passes: Option<u32>,
        /// Final scale (the last pass's output resized down to it).
        #[arg(long)]
        scale: Option<f64>,
        /// Tile side in input pixels (0: the whole image at once); default: UPSCALE_MEMORY's.
        #[arg(long)]
        tile: Option<usize>,
        /// Context around each tile in input pixels.
        #[arg(long, default_value_t = crate::burn::upscale::DEFAULT_TILE_PAD)]
        pad: usize,
        /// Untimed runs before the timed one.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
    },
    /// Write a random-weight kohya LoRA for a model's UNet attention projections (a demo or a
    /// test fixture: the demo models have no real LoRAs). Name the file `lcm-*.safetensors` and
    /// nodes take it for an LCM-LoRA.
    MakeLora {
        /// The model folder (diffusers layout, e.g. one `make-model` wrote).
        #[arg(long)]
        model: PathBuf,
        /// The LoRA file to write (`.safetensors`).
        #[arg(long)]
        out: PathBuf,
        /// Rank of every pair.
        #[arg(long, default_value_t = 4)]
        rank: usize,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Print, as JSON, the single-file (LDM) name Drover gives each tensor of a diffusers UNet
    /// and/or VAE folder: `{"unet": [[diffusers, ldm], ...], "vae": [...]}` (what
    /// `scripts/make_ldm_reference.py` checks against diffusers' own converters).
    LdmNames {
        /// A diffusers UNet folder (`config.json` + weights).
        #[arg(long)]
        unet: Option<PathBuf>,
        /// A diffusers VAE folder.
        #[arg(long)]
        vae: Option<PathBuf>,
    },
    /// Run one UNet forward on tensors from a file and write tensor `out` (f32).
    UnetEval {
        /// UNet weights (.safetensors, diffusers or LDM names).
        #[arg(long)]
        unet: PathBuf,
        /// Tensors `sample`, `timestep`, `encoder_hidden_states` (+ `timestep_cond` or `guidance`;
        /// SDXL: + `text_embeds`, `time_ids`).
        #[arg(long)]
        inputs: PathBuf,
        /// Output .safetensors.
        #[arg(long)]
        output: PathBuf,
        /// diffusers UNet config.json, for shapes outside the standard families.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A LoRA to merge first.
        #[arg(long)]
        lora: Option<PathBuf>,
        /// The LoRA's strength.
        #[arg(long, default_value_t = 1.0)]
        lora_scale: f32,
        /// `cpu`, or `cuda` in builds with the `cuda` feature; `-f16` or `-bf16` appended runs
        /// the weights in that dtype.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run one text encoder or VAE decoder forward of a diffusers folder on tensors from a file
    /// and write tensor `out` (f32).
    ComponentEval {
        /// `text-encoder` (input tensor `input_ids`) or `vae` (input tensor `latents`).
        #[arg(long, value_parser = ["text-encoder", "vae"])]
        component: String,
        /// The diffusers folder (`text_encoder/`, `vae/`).
        #[arg(long)]
        model: PathBuf,
        /// Input tensors (.safetensors).
        #[arg(long)]
        inputs: PathBuf,
        /// Output .safetensors.
        #[arg(long)]
        output: PathBuf,
        /// `cpu`, or `cuda` in builds with the `cuda` feature; `-f16` or `-bf16` appended runs
        /// the weights in that dtype.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Time UNet steps of a random-weight UNet (prints one JSON line).
    BenchUnet {
        /// `sd15`, `sd15-lcm`, `sd2`, `sdxl`, `sdxl-lcm`, `demo`, `demo-sdxl` or a config.json path.
        #[arg(long, default_value = "demo")]
        shape: String,
        /// Image side in pixels (latent = side / 8).
        #[arg(long, default_value_t = 512)]
        size: usize,
        /// Timed runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Untimed warm-up runs (kernel compilation and autotuning on GPUs).
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// `cpu`, or `cuda` in builds with the `cuda` feature; `-f16` or `-bf16` appended runs the
        /// weights in that dtype (`cuda-f16` is what cuda workers run).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Time LoRA switches on the CPU: in place (what workers do) against reloading the text
    /// encoders and UNet with the LoRAs merged (what they did before), same run, same model;
    /// checks both give the same weights' output and prints the figures (JSON).
    BenchLora {
        /// The model folder.
        #[arg(long)]
        model: PathBuf,
        /// LoRA files to switch on together (each at strength 0.8), then off.
        #[arg(long, required = true, num_args = 1..)]
        lora: Vec<PathBuf>,
        /// Timed on/off cycles of each way.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Exit 0 when the node running beside this command is ready (its models loaded and its
    /// session open: `DROVER_READY_FILE` exists), 1 otherwise — a container's readiness probe.
    Ready {
        /// The file the node writes when ready.
        #[arg(
            long,
            env = "DROVER_READY_FILE",
            default_value = "/tmp/drover-node.ready"
        )]
        file: PathBuf,
    },
    /// Time loading a model on the CPU (f32), as a node loads it when a job needs it: `--runs`
    /// loads in this process, each timed (JSON); run it after dropping the files from the page
    /// cache for a cold load (`scripts/bench-load.sh`).
    BenchLoad {
        /// The model (file or folder, as MODEL).
        #[arg(long)]
        model: PathBuf,
        /// Loads, one after another.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Render one image from a diffusers model folder, without a coordinator, and print how
    /// long each part took (JSON).
    Render {
        /// The model folder.
        #[arg(long)]
        model: PathBuf,
        /// `cpu`, or `cuda` in builds with the `cuda` feature; `-f16` or `-bf16` appended runs
        /// the text encoders and UNet in that dtype (the VAE stays f32), as cuda workers do.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Untimed renders first (kernel compilation on GPUs); the timed one is the last.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// What to render.
        #[command(flatten)]
        args: RenderArgs,
        /// Render this many text-to-image jobs (seeds `--seed`, `--seed`+1, ...) as one batch
        /// and report images per second; the first image is written.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        batch: u32,
        /// PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// What `drover-node render` renders.
#[derive(clap::Args, Clone, Debug)]
pub struct RenderArgs {
    /// Prompt.
    #[arg(long, default_value = "a lighthouse at dusk")]
    pub prompt: String,
    /// Negative prompt (classifier-free guidance on standard models).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Sampler (A1111 name or id); the model's default when absent.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Guidance scale.
    #[arg(long, default_value_t = 7.0)]
    pub guidance: f32,
    /// Image side in pixels.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Start from this image (PNG or JPEG): image-to-image.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Inpainting mask (PNG or JPEG, white repaints), with `--init-image`.
    #[arg(long, requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// Strength in (0, 1], with `--init-image` (0.75; 1 with a mask).
    #[arg(long, requires = "init_image")]
    pub strength: Option<f64>,
}

/// A model the node was told to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPath {
    /// Its name in the farm (as given in MODEL, or the entry's name under MODEL_ROOT).
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
    /// Named by the operator (MODEL, a MODELS list): a model that fails stops the start. Found
    /// by `MODELS=*`: skipped with the reason.
    pub explicit: bool,
}

/// Settings of one node process.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeConfig {
    /// gRPC address of the coordinator; a comma-separated list names the replicas of a
    /// replicated coordinator (the node keeps to the one that leads, trying each in turn).
    #[arg(long, env = "COORDINATOR_URL", default_value = "http://127.0.0.1:4201")]
    pub coordinator_url: String,
    /// A file the node creates once its models are loaded and its session is open, and removes
    /// when the session breaks (`drover-node ready` reads it: a readiness probe).
    #[arg(long, env = "DROVER_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Folder holding models.
    #[arg(long, env = "MODEL_ROOT")]
    pub model_root: Option<PathBuf>,
    /// Model file or folder under MODEL_ROOT; a comma-separated list serves several (the
    /// first is the default of jobs that name none).
    #[arg(long, env = "MODEL")]
    pub model: Option<String>,
    /// `*`: serve every model found under MODEL_ROOT (files and folders that are not models are
    /// skipped with the reason); or a comma-separated list, as MODEL. MODEL, when also set,
    /// names the default model.
    #[arg(long, env = "MODELS")]
    pub models: Option<String>,
    /// Bytes the resident models may take (host memory on cpu, per device on cuda), e.g. `6G`:
    /// a job for a model not loaded evicts the least recently used idle ones. Default: three
    /// quarters of the host's memory on cpu, no limit on cuda.
    #[arg(long, env = "NODE_MEMORY_BUDGET", value_parser = crate::residency::parse_bytes)]
    pub memory_budget: Option<u64>,
    /// Models loaded at start and never evicted (comma-separated names, as in MODEL).
    #[arg(long, env = "PIN_MODELS", value_delimiter = ',')]
    pub pin_models: Vec<String>,
    /// Worker backend.
    #[arg(long, env = "BACKEND", value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// Number of worker actors (default: 1 per GPU, 3 for rknn, 1 for cpu, 2 for sim); for
    /// cuda, per device.
    #[arg(long, env = "NUM_WORKERS")]
    pub num_workers: Option<u32>,
    /// cuda: the devices to use, e.g. `0,2` (indices after `CUDA_VISIBLE_DEVICES`; default all).
    #[arg(long, env = "GPUS")]
    pub gpus: Option<String>,
    /// The dtype of the text encoders and UNet (default: f16 on cuda, f32 on cpu); the VAE
    /// decodes in f32 whenever this is f16 or bf16.
    #[arg(long, env = "PRECISION", value_enum)]
    pub precision: Option<PrecisionKind>,
    /// What the model predicts, overriding its scheduler config: `epsilon` or `v_prediction`
    /// (single-file SD2 768-v checkpoints, which cannot say so themselves).
    #[arg(long, env = "PREDICTION", value_parser = ["epsilon", "v_prediction"])]
    pub prediction: Option<String>,
    /// Folder for compiled GPU kernels, kept across restarts (default: `drover-node` under the
    /// user's cache folder).
    #[arg(long, env = "DROVER_NODE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Upscalers run after generation on jobs that ask (`upscale`): comma-separated
    /// super-resolution files under MODEL_ROOT (`x4` or `x4.safetensors`) or paths; named in the
    /// farm by file stem.
    #[arg(long, env = "UPSCALER")]
    pub upscaler: Option<String>,
    /// Upscaler tile side in input pixels (0: whole images in one call); default: the largest
    /// that fits UPSCALE_MEMORY.
    #[arg(long, env = "UPSCALE_TILE")]
    pub upscale_tile: Option<usize>,
    /// Real image context around each upscaler tile, in input pixels (default 32).
    #[arg(long, env = "UPSCALE_TILE_PAD")]
    pub upscale_tile_pad: Option<usize>,
    /// Working memory one upscaler tile may use, in bytes (sets the default tile size).
    #[arg(long, env = "UPSCALE_MEMORY", default_value_t = NodeConfig::default_upscale_memory())]
    pub upscale_memory: u64,
    /// Most jobs one worker renders in one batch (one UNet call per step for all of them):
    /// 1 renders one at a time; GPU nodes gain from 4–8. Jobs batch only when they share size,
    /// steps, sampler, guidance and LoRAs, and only when every worker is busy (no job waits
    /// for partners). RKNN nodes render one at a time.
    #[arg(long, env = "MAX_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_batch: u32,
    /// Folder of LoRA files (`NAME.safetensors`).
    #[arg(long, env = "LORA_ROOT")]
    pub lora_root: Option<PathBuf>,
    /// LoRAs under LORA_ROOT that are LCM-LoRAs although neither their file name nor their
    /// metadata says so (comma-separated names); they let standard models run `lcm`.
    #[arg(long, env = "LCM_LORAS", value_delimiter = ',')]
    pub lcm_loras: Vec<String>,
    /// Name of this node in the farm (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// PEM certificate of a CA to trust (besides the public roots) when COORDINATOR_URL is
    /// `https://`, e.g. the coordinator's self-signed certificate.
    #[arg(long, env = "DROVER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: COORDINATOR_URL's host).
    #[arg(long, env = "DROVER_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Token the coordinator requires, if any.
    #[arg(long, env = "DROVER_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,
    /// Family the sim backend pretends to serve.
    #[arg(long, env = "SIM_FAMILY", default_value = "sd15")]
    pub sim_family: ModelFamily,
    /// A simulated catalogue for the sim backend: comma-separated `name` or `name:family`
    /// (family default SIM_FAMILY); each model is `sim-NAME`, takes 2 GiB (7 GiB for sdxl) of
    /// NODE_MEMORY_BUDGET and loads in SIM_LOAD_MS.
    #[arg(long, env = "SIM_MODELS")]
    pub sim_models: Option<String>,
    /// Milliseconds a simulated model takes to load (SIM_MODELS).
    #[arg(long, env = "SIM_LOAD_MS", default_value_t = 1000)]
    pub sim_load_ms: u64,
    /// Milliseconds the sim backend spends per step.
    #[arg(long, env = "SIM_STEP_MS", default_value_t = 50)]
    pub sim_step_ms: u64,
    /// Largest width*height this node accepts (default: the backend's own limit).
    #[arg(long, env = "MAX_PIXELS")]
    pub max_pixels: Option<u64>,
    /// The RKNN runtime library for `BACKEND=rknn` (default: `librknnrt.so` through the
    /// dynamic loader).
    #[arg(long, env = "RKNN_LIBRARY")]
    pub rknn_library: Option<PathBuf>,
}

impl NodeConfig {
    /// `UPSCALE_MEMORY`'s default: 1 GiB.
    pub const fn default_upscale_memory() -> u64 {
        1 << 30
    }

    /// The model path: `MODEL` joined to `MODEL_ROOT` (or `MODEL` alone when absolute or when
    /// `MODEL_ROOT` is unset). With a list, the first.
    pub fn model_path(&self) -> Option<PathBuf> {
        self.model_paths().ok()?.into_iter().next().map(|m| m.path)
    }

    /// Whether any model is configured (MODEL, MODELS or MODEL_ROOT).
    pub fn has_models(&self) -> bool {
        self.model.is_some() || self.models.is_some() || self.model_root.is_some()
    }

    /// The models to serve, the default first: MODEL's list, then MODELS' entries (`*`: every
    /// file or folder under MODEL_ROOT, in name order) not already named; a name may repeat
    /// nowhere. Without either, MODEL_ROOT itself.
    pub fn model_paths(&self) -> Result<Vec<ModelPath>, String> {
        let join = |name: &str| match &self.model_root {
            Some(root) => root.join(name),
            None => PathBuf::from(name),
        };
        let list = |text: &str| -> Vec<String> {
            text.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect()
        };
        let mut out: Vec<ModelPath> = Vec::new();
        for name in self.model.as_deref().map(list).unwrap_or_default() {
            out.push(ModelPath {
                path: join(&name),
                name,
                explicit: true,
            });
        }
        match self.models.as_deref().map(str::trim) {
            Some("*") => {
                let root = self.model_root.as_ref().ok_or(
                    "MODELS=* serves every model under MODEL_ROOT, but MODEL_ROOT is not set",
                )?;
                let mut names: Vec<String> = std::fs::read_dir(root)
                    .map_err(|e| format!("MODEL_ROOT {}: {e}", root.display()))?
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect();
                names.sort();
                for name in names {
                    if !out.iter().any(|m| m.name == name) {
                        out.push(ModelPath {
                            path: root.join(&name),
                            name,
                            explicit: false,
                        });
                    }
                }
            }
            Some(text) => {
                for name in list(text) {
                    if !out.iter().any(|m| m.name == name) {
                        out.push(ModelPath {
                            path: join(&name),
                            name,
                            explicit: true,
                        });
                    }
                }
            }
            None => {}
        }
        if out.is_empty()
            && let Some(root) = &self.model_root
        {
            out.push(ModelPath {
                name: root.file_name().map_or_else(
                    || root.display().to_string(),
                    |n| n.to_string_lossy().into(),
                ),
                path: root.clone(),
                explicit: true,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = out.iter().find(|m| !seen.insert(m.name.as_str())) {
            return Err(format!("model {} is named twice", twice.name));
        }
        Ok(out)
    }

    /// The node's name: `NODE_NAME`, else the host name, else `node`.
    pub fn name(&self) -> String {
        self.node_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "node".to_string())
    }
}
