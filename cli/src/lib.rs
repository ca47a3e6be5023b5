//! `drover`, the command-line client of the REST API: generate an image with a progress bar fed by
//! the job's event stream, list jobs and nodes, drain/resume nodes, cancel jobs.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

mod api;

use api::Api;
pub use api::trusting;

/// The `drover` command line.
#[derive(clap::Parser, Debug)]
#[command(
    name = "drover",
    version,
    about = "Drover client: images, jobs and nodes of a farm"
)]
pub struct Cli {
    /// The coordinator's REST address; a comma-separated list names the replicas of a
    /// replicated coordinator (calls go to the one that leads).
    #[arg(
        long,
        env = "DROVER_URL",
        default_value = "http://127.0.0.1:4200",
        global = true
    )]
    pub url: String,
    /// API key, when the coordinator requires one.
    #[arg(long, env = "DROVER_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM certificate of a CA to trust besides the public roots, for an `https://` URL with a
    /// self-signed certificate.
    #[arg(long, env = "DROVER_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Admin token for drain/resume.
    #[arg(
        long,
        env = "DROVER_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What `generate` and `img2img` render.
#[derive(clap::Args, Debug, Clone)]
pub struct RenderArgs {
    /// Output file.
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
    /// Model family (`sd15`, `sd2`, `sdxl`) or model id.
    #[arg(long)]
    pub model: Option<String>,
    /// Size `WxH` (from a source image: its own, rounded to multiples of 8, when absent).
    #[arg(long)]
    pub size: Option<String>,
    /// Denoising steps (a source's strength runs a fraction of them).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Guidance scale.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Sampler (`Euler a`, `DPM++ 2M Karras`, `UniPC`, `lcm`, ...); the serving model's
    /// default when absent.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<i64>,
    /// Negative prompt.
    #[arg(long)]
    pub negative: Option<String>,
}

/// How a source image is used.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// Inpainting mask (PNG or JPEG, the source's size; white repaints).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// How far from the source to go, in (0, 1] (0.75; 1 with a mask).
    #[arg(long)]
    pub strength: Option<f64>,
    /// How the source is fitted to `--size`: resize, crop, fill.
    #[arg(long)]
    pub resize_mode: Option<String>,
}

/// `drover` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Render one image and write it to a PNG file, showing progress.
    Generate {
        /// The prompt.
        prompt: String,
        /// What to render.
        #[command(flatten)]
        render: RenderArgs,
        /// A catalog style, `STYLE` or `STYLE:LEVEL` (level 1 when absent).
        #[arg(long)]
        style: Option<String>,
        /// A LoRA, `NAME` or `NAME:STRENGTH` (1.0 when absent); repeatable.
        #[arg(long)]
        lora: Vec<String>,
        /// Start from this image (PNG or JPEG): image-to-image.
        #[arg(long)]
        init_image: Option<PathBuf>,
        /// The source's mask and strength (with `--init-image`).
        #[command(flatten)]
        source: SourceArgs,
        /// Upscale the result on a node with this upscaler (`any`: the node's first).
        #[arg(long)]
        upscale: Option<String>,
    },
    /// Upscale an image with an upscaler of the farm (no model runs) and write a PNG.
    Upscale {
        /// The image (PNG or JPEG).
        input: PathBuf,
        /// Output file.
        #[arg(short, long, default_value = "upscaled.png")]
        output: PathBuf,
        /// The upscaler (`drover upscalers` lists them); the node's first when absent.
        #[arg(long)]
        upscaler: Option<String>,
        /// Final scale (the last pass's output resized down to it).
        #[arg(long)]
        scale: Option<f64>,
        /// Passes of the upscaler, 1..=3.
        #[arg(long)]
        passes: Option<u32>,
    },
    /// The farm's upscalers.
    Upscalers,
    /// Render from an image (image-to-image; inpainting with `--mask`) and write a PNG.
    Img2img {
        /// The source image (PNG or JPEG).
        input: PathBuf,
        /// The prompt.
        prompt: String,
        /// What to render.
        #[command(flatten)]
        render: RenderArgs,
        /// The source's mask and strength.
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Unfinished jobs.
    Jobs,
    /// One job, in full.
    Job {
        /// Job id.
        id: String,
    },
    /// Registered nodes.
    Nodes,
    /// Stop giving a node new work (by name or id; needs the admin token when one is set).
    Drain {
        /// Node name or id (default: `NODE_NAME`, as in a node's own container).
        #[arg(env = "NODE_NAME")]
        node: String,
        /// Then wait (up to this many seconds) until the node runs nothing: a node's shutdown
        /// hook (Kubernetes `preStop`) lets its jobs finish before the node stops.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Give a drained node work again.
    Resume {
        /// Node name or id.
        node: String,
    },
    /// The farm's models: family, nodes serving each, where each is loaded.
    Models,
    /// Order a node to load, unload, pin or unpin one of its models (needs the admin token when
    /// one is set); the node carries it out in the background.
    Model {
        /// What to do.
        #[arg(value_parser = ["load", "unload", "pin", "unpin"])]
        action: String,
        /// Node name or id.
        node: String,
        /// The model's id or its name on the node.
        model: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Exit 0 when the coordinator answers `/healthz` (container health checks).
    Health,
}

fn split_pair(text: &str, default: f64) -> Result<(String, f64)> {
    match text.split_once(':') {
        Some((name, v)) => Ok((
            name.to_string(),
            v.parse()
                .with_context(|| format!("{text}: `{v}` is not a number"))?,
        )),
        None => Ok((text.to_string(), default)),
    }
}

/// How a job's progress is shown: a bar on a terminal, one line per event otherwise (logs and
/// pipes get every step, not a redrawn line).
enum Display {
    /// A spinner while the job waits, a bar of its steps while it runs.
    Bar(indicatif::ProgressBar),
    /// Plain lines on stderr.
    Lines,
}

impl Display {
    fn new() -> Self {
        use std::io::IsTerminal as _;
        if !std::io::stderr().is_terminal() {
            return Self::Lines;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        Self::Bar(bar)
    }

    fn message(&self, text: String) {
        match self {
            Self::Bar(bar) => bar.set_message(text),
            Self::Lines => eprintln!("{text}"),
        }
    }

    fn note(&self, text: String) {
        match self {
            Self::Bar(bar) => bar.println(text),
            Self::Lines => eprintln!("{text}"),
        }
    }

    fn steps(&self, step: u64, total: u64) {
        match self {
            Self::Bar(bar) => {
                if bar.length() != Some(total) {
                    let style = indicatif::ProgressStyle::with_template(
                        "{spinner} [{bar:30}] {pos}/{len} steps {elapsed}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("#>-");
                    bar.set_style(style);
                    bar.set_length(total);
                }
                bar.set_position(step);
            }
            Self::Lines => eprintln!("step {step}/{total}"),
        }
    }

    fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Submits one job and follows it to its PNG: `generate` and `img2img`.
fn generate(
    api: &Api,
    prompt: &str,
    render: &RenderArgs,
    extras: (&Option<String>, &[String], &Option<String>),
    init_image: Option<&PathBuf>,
    source: &SourceArgs,
) -> Result<()> {
    let (style, lora, upscale) = extras;
    let RenderArgs {
        output,
        model,
        size,
        steps,
        guidance,
        sampler,
        seed,
        negative,
    } = render;
    if init_image.is_none() && (source.mask.is_some() || source.strength.is_some()) {
        bail!("--mask and --strength need --init-image");
    }
    let mut body = json!({ "prompt": prompt });
    let set = |body: &mut Value, k: &str, v: Value| {
        if !v.is_null() {
            body[k] = v;
        }
    };
    set(&mut body, "model", json!(model));
    set(&mut body, "size", json!(size));
    set(&mut body, "steps", json!(steps));
    set(&mut body, "guidance_scale", json!(guidance));
    set(&mut body, "sampler", json!(sampler));
    set(&mut body, "seed", json!(seed));
    set(&mut body, "negative_prompt", json!(negative));
    let encoded = |path: &PathBuf| -> Result<Value> {
        use base64::Engine;
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(json!(
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ))
    };
    if let Some(path) = init_image {
        body["init_image"] = encoded(path)?;
    }
    if let Some(path) = &source.mask {
        body["mask"] = encoded(path)?;
    }
    set(&mut body, "strength", json!(source.strength));
    set(&mut body, "resize_mode", json!(source.resize_mode));
    if let Some(s) = style {
        let (name, level) = split_pair(s, 1.0)?;
        body["style_lora"] = json!({"style": name, "level": level as u32});
    }
    if !lora.is_empty() {
        let list: Vec<Value> = lora
            .iter()
            .map(|l| split_pair(l, 1.0).map(|(n, s)| json!({"name": n, "strength": s})))
            .collect::<Result<_>>()?;
        body["loras"] = Value::Array(list);
    }
    match upscale.as_deref() {
        None => {}
        Some("any") => body["upscale"] = json!({}),
        Some(name) => body["upscale"] = json!({ "model": name }),
    }
    let job = api.send("POST", "/v1/jobs", Some(&body))?;
    let id = job["id"]
        .as_str()
        .context("no job id in the answer")?
        .to_string();
    eprintln!("job {id} accepted");
    let response = api
        .get_request(&format!("/v1/jobs/{id}/events"))
        .call()
        .context("cannot open the job's event stream")?;
    let reader = BufReader::new(response.into_body().into_reader());
    let mut done = Value::Null;
    let display = Display::new();
    for line in reader.lines() {
        let line = line.context("the event stream broke")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let event: Value = serde_json::from_str(data).context("a malformed event")?;
        match event["event"].as_str() {
            Some("queued") => display.message(format!("queued, {} ahead", event["position"])),
            Some("assigned") => display.message(format!("running on node {}", event["node_id"])),
            Some("progress") => display.steps(
                event["step"].as_u64().unwrap_or(0),
                event["total"].as_u64().unwrap_or(0),
            ),
            Some("requeued") => display.note(format!("requeued: {}", event["reason"])),
            Some("done") => {
                done = event;
                break;
            }
            _ => {}
        }
    }
    display.finish();
    if done["state"] != "succeeded" {
        bail!(
            "job {id} {}: {}",
            done["state"].as_str().unwrap_or("ended without a result"),
            done["error"].as_str().unwrap_or("no reason given")
        );
    }
    let mut image = api
        .get_request(&format!("/v1/jobs/{id}/image"))
        .call()
        .context("cannot fetch the image")?;
    let png = image
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()
        .context("cannot read the image")?;
    std::fs::write(output, &png).with_context(|| format!("cannot write {}", output.display()))?;
    let record = api.get(&format!("/v1/jobs/{id}"))?;
    println!(
        "{} written ({} bytes, seed {}, node {})",
        output.display(),
        png.len(),
        record["spec"]["seed"],
        record["node_id"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Upscales one image through `POST /v1/upscale` (the coordinator waits for it) and writes the
/// PNG.
fn upscale(
    api: &Api,
    input: &PathBuf,
    output: &PathBuf,
    upscaler: Option<&str>,
    scale: Option<f64>,
    passes: Option<u32>,
) -> Result<()> {
    use base64::Engine;
    let bytes = std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
    let mut body = json!({ "image": base64::engine::general_purpose::STANDARD.encode(bytes) });
    if let Some(name) = upscaler {
        body["model"] = json!(name);
    }
    if let Some(s) = scale {
        body["scale"] = json!(s);
    }
    if let Some(p) = passes {
        body["passes"] = json!(p);
    }
    let mut response = api
        .agent
        .post(format!("{}/v1/upscale", api.url))
        .header("x-api-key", api.api_key.clone().unwrap_or_default())
        .send_json(&body)
        .with_context(|| format!("cannot reach the coordinator at {}", api.url))?;
    let status = response.status();
    let node = response
        .headers()
        .get("x-node-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    if !status.is_success() {
        return api.json(response).map(drop);
    }
    let png = response
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()
        .context("cannot read the image")?;
    std::fs::write(output, &png).with_context(|| format!("cannot write {}", output.display()))?;
    println!(
        "{} written ({} bytes, node {node})",
        output.display(),
        png.len()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let api = Api::new(&cli)?;
    match &cli.command {
        Command::Generate {
            prompt,
            render,
            style,
            lora,
            init_image,
            source,
            upscale,
        } => generate(
            &api,
            prompt,
            render,
            (style, lora, upscale),
            init_image.as_ref(),
            source,
        )?,
        Command::Upscale {
            input,
            output,
            upscaler,
            scale,
            passes,
        } => upscale(&api, input, output, upscaler.as_deref(), *scale, *passes)?,
        Command::Upscalers => {
            let list = api.get("/v1/upscalers")?;
            println!("{:<24} {:<6} {:<7} network", "name", "scale", "nodes");
            for u in list.as_array().into_iter().flatten() {
                println!(
                    "{:<24} ×{:<5} {:<7} {}",
                    u["name"].as_str().unwrap_or("?"),
                    u["scale"],
                    format!("{}/{}", u["nodes_online"], u["nodes"]),
                    u["network"].as_str().unwrap_or("")
                );
            }
        }
        Command::Img2img {
            input,
            prompt,
            render,
            source,
        } => generate(
            &api,
            prompt,
            render,
            (&None, &[], &None),
            Some(input),
            source,
        )?,
        Command::Jobs => {
            let jobs = api.get("/v1/jobs")?;
            println!("{:<38} {:<10} {:<8} prompt", "id", "state", "progress");
            for j in jobs.as_array().into_iter().flatten() {
                let progress = match (j["progress"][0].as_u64(), j["progress"][1].as_u64()) {
                    (Some(s), Some(t)) => format!("{s}/{t}"),
                    _ => "-".into(),
                };
                println!(
                    "{:<38} {:<10} {:<8} {}",
                    j["id"].as_str().unwrap_or(""),
                    j["state"].as_str().unwrap_or(""),
                    progress,
                    j["spec"]["prompt"].as_str().unwrap_or("")
                );
            }
        }
        Command::Job { id } => {
            println!("{:#}", api.get(&format!("/v1/jobs/{id}"))?);
        }
        Command::Nodes => {
            let nodes = api.get("/v1/nodes")?;
            println!(
                "{:<20} {:<9} {:<7} {:<6} {:<8} id",
                "name", "state", "backend", "family", "workers"
            );
            for n in nodes.as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:<9} {:<7} {:<6} {:<8} {}",
                    n["name"].as_str().unwrap_or(""),
                    n["state"].as_str().unwrap_or(""),
                    n["backend"].as_str().unwrap_or(""),
                    n["family"].as_str().unwrap_or(""),
                    n["workers"],
                    n["id"].as_str().unwrap_or("")
                );
            }
        }
        Command::Drain { node, .. } | Command::Resume { node } => {
            let verb = if matches!(cli.command, Command::Drain { .. }) {
                "drain"
            } else {
                "resume"
            };
            let id = api.node_id(node)?;
            let answer = api.send("POST", &format!("/v1/nodes/{id}/{verb}"), None)?;
            println!(
                "{} draining: {}",
                answer["name"].as_str().unwrap_or(node),
                answer["draining"]
            );
            if let Command::Drain {
                wait: Some(seconds),
                ..
            } = &cli.command
            {
                let deadline = std::time::Instant::now() + Duration::from_secs(*seconds);
                loop {
                    let running = api
                        .get("/v1/nodes")?
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|n| n["id"] == id.as_str())
                        .and_then(|n| n["running"].as_u64())
                        .unwrap_or(0);
                    if running == 0 {
                        println!("{node} runs nothing");
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        bail!("{node} still runs {running} jobs after {seconds} s");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Command::Models => {
            let models = api.get("/v1/models")?;
            println!(
                "{:<24} {:<6} {:<14} {:<28} loaded on",
                "name", "family", "id", "served by"
            );
            let names = |v: &serde_json::Value| {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            for m in models.as_array().into_iter().flatten() {
                let id = m["model_id"].as_str().unwrap_or("");
                println!(
                    "{:<24} {:<6} {:<14} {:<28} {}",
                    m["model_name"].as_str().unwrap_or(""),
                    m["family"].as_str().unwrap_or(""),
                    id.get(..12).unwrap_or(id),
                    names(&m["served_by"]),
                    names(&m["resident_on"]),
                );
            }
        }
        Command::Model {
            action,
            node,
            model,
        } => {
            let id = api.node_id(node)?;
            let answer = api.send(
                "POST",
                &format!("/v1/nodes/{id}/models/{model}/{action}"),
                None,
            )?;
            println!(
                "{} on {}: {} sent",
                answer["model"].as_str().unwrap_or(model),
                answer["node"].as_str().unwrap_or(node),
                answer["action"].as_str().unwrap_or(action)
            );
        }
        Command::Health => {
            let health = api.get("/healthz")?;
            println!("{health}");
        }
        Command::Cancel { id } => {
            let answer = api.send("DELETE", &format!("/v1/jobs/{id}"), None)?;
            println!(
                "{} {}",
                answer["id"].as_str().unwrap_or(id),
                answer["state"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// Entry point of the `drover` binary.
pub fn cli_main() -> ExitCode {
    use clap::Parser;
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover: {e:#}");
            ExitCode::FAILURE
        }
    }
}
