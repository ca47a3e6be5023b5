#!/usr/bin/env python3
"""Builds the parity fixtures for drover-node's Burn SD1.x pipeline.

Tiny random models of every component are made with diffusers/transformers (fixed seeds), their
weights rounded to f16 or bf16 (and stored in that dtype, so the Rust loader reads exactly the values
PyTorch computed with), and run on fixed inputs. Everything lands in `node/tests/fixtures/`:

  tiny-sd15-lcm/        a diffusers folder: model_index.json, tokenizer/, text_encoder/, unet/ (LCM,
                        time_cond_proj_dim, linear projections), vae/, scheduler/
  tiny-unet/            a plain SD1-style UNet (conv projections, no time_cond_proj_dim)
  tokenizer-json/       the same tokenizer as one tokenizer.json
  tiny-sdxl-lcm/        an SDXL-shaped diffusers folder: tokenizer/ + tokenizer_2/, text_encoder/
                        (CLIP-L style) + text_encoder_2/ (with projection), unet/ (text_time added
                        conditioning, 2 transformer blocks at level 1, LCM), vae/ (scaling 0.13025)
  lora-kohya.safetensors, lora-peft.safetensors   one LoRA for tiny-unet in both formats
  lora-sdxl-kohya.safetensors   an SDXL LoRA (unet + both text encoders, kohya names)
  parity.safetensors    inputs and expected outputs for every check
  parity.json           the prompts and their expected token ids

Run it from the repository root: `python3 scripts/make_fixtures.py` (needs torch, diffusers,
transformers, safetensors from PyPI). No weights are downloaded.
"""

import collections
import json
import os
import re

import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "node", "tests", "fixtures")
MODEL = os.path.join(ROOT, "tiny-sd15-lcm")
torch.set_grad_enabled(False)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB = 1000
CROSS = 32


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


CORPUS = """
a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus
a watercolor painting of a lighthouse at dusk with soft light and gentle waves
portrait of a cat wearing a tiny hat, studio lighting, 85mm, bokeh, trending on artstation
an ink drawing of a mountain village in winter, snow, smoke rising from chimneys
cinematic still of a futuristic city street at night, neon signs, rain, reflections
a bowl of fruit on a wooden table, oil painting, impressionism, warm colors
"""


def train_bpe(corpus, merges_wanted):
    """A minimal CLIP-style BPE trainer: words end with `</w>`, pairs merged by frequency."""
    byte_map = bytes_to_unicode()
    pattern = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")
    words = collections.Counter()
    for w in pattern.findall(corpus.lower()):
        chars = [byte_map[b] for b in w.encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        words[tuple(chars)] += 1
    merges = []
    while len(merges) < merges_wanted:
        pairs = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        new_words = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    base = list(byte_map.values())
    vocab = base + [c + "</w>" for c in base]
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    vocab += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(folder):
    vocab, merges = train_bpe(CORPUS, 200)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return len(vocab)


def round_to(module, dtype):
    """Round every parameter to `dtype` (values then exactly representable there) and keep f32."""
    for p in module.parameters():
        p.data = p.data.to(dtype).to(torch.float32)
    for b in module.buffers():
        if b.is_floating_point():
            b.data = b.data.to(dtype).to(torch.float32)
    return module


def save_component(module, folder, filename, dtype, config):
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()
             if not k.endswith("position_ids")}
    save_file(state, os.path.join(folder, filename))
    config = dict(config)
    if "_use_default_values" in config:
        config["_use_default_values"] = sorted(config["_use_default_values"])
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def unet_config(lcm):
    return dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=CROSS,
        attention_head_dim=8, norm_num_groups=32,
        use_linear_projection=lcm, time_cond_proj_dim=256 if lcm else None,
    )


def lora_targets(unet):
    """The module paths the test LoRA touches: attention, projections, feed-forward, a 3×3 conv."""
    out = []
    for name, m in unet.named_modules():
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name) or re.search(r"\.(proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$", name):
            out.append((name, m))
        elif name in ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.time_emb_proj"):
            out.append((name, m))
    return out


def make_lora(unet, gen, rank=4, alpha=2.0, strength=0.8):
    """Merges a random LoRA into `unet` and returns its kohya and PEFT files' tensors."""
    kohya, peft = {}, {}
    scale = alpha / rank
    for name, m in lora_targets(unet):
        w = m.weight
        if w.dim() == 4:
            down = randn(gen, rank, w.shape[1], w.shape[2], w.shape[3]) * 0.1
            up = randn(gen, w.shape[0], rank, 1, 1) * 0.1
        else:
            down = randn(gen, rank, w.shape[1]) * 0.1
            up = randn(gen, w.shape[0], rank) * 0.1
        down = down.half().float()
        up = up.half().float()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        w.data += strength * scale * delta
        k = "lora_unet_" + name.replace(".", "_")
        kohya[k + ".lora_down.weight"] = down.half()
        kohya[k + ".lora_up.weight"] = up.half()
        kohya[k + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
        # diffusers-style PEFT files carry no alpha (scale 1): fold alpha/rank into lora_B.
        peft[f"unet.{name}.lora_A.weight"] = down.half()
        peft[f"unet.{name}.lora_B.weight"] = (up * scale).half()
    return kohya, peft


def lcm_scheduler():
    return LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon",
                        clip_sample=False, set_alpha_to_one=True)


def guidance_embedding(w, dim):
    w = w * 1000.0
    half = dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=torch.float32) * -emb)
    emb = w.to(torch.float32)[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def main():
    os.makedirs(ROOT, exist_ok=True)
    fixtures = {}
    meta = {}

    # Tokenizer: a small CLIP BPE vocabulary, checked against transformers' CLIPTokenizer.
    vocab_size = write_tokenizer(os.path.join(MODEL, "tokenizer"))
    assert vocab_size <= VOCAB, vocab_size
    tok = CLIPTokenizer(os.path.join(MODEL, "tokenizer", "vocab.json"),
                        os.path.join(MODEL, "tokenizer", "merges.txt"), pad_token=EOS)
    tok.save_pretrained(os.path.join(MODEL, "tokenizer"))
    os.makedirs(os.path.join(ROOT, "tokenizer-json"), exist_ok=True)
    fast = tok if hasattr(tok, "backend_tokenizer") else __import__("transformers").CLIPTokenizerFast(
        os.path.join(MODEL, "tokenizer", "vocab.json"), os.path.join(MODEL, "tokenizer", "merges.txt"), pad_token=EOS)
    fast.backend_tokenizer.save(os.path.join(ROOT, "tokenizer-json", "tokenizer.json"))
    prompts = [
        "a photograph of an astronaut riding a horse",
        "A Watercolor  painting of a LIGHTHOUSE, at dusk!",
        "portrait of a cat wearing a tiny hat; 85mm bokeh 1234",
        "zebra quokka xylophone",
        "",
        " ".join(["horse"] * 100),
    ]
    meta["prompts"] = [
        {"prompt": p, "ids": tok(p, padding="max_length", max_length=77, truncation=True).input_ids}
        for p in prompts
    ]

    # Text encoder (SD1.5 CLIP-L shape, scaled down): quick_gelu, causal attention, final layer norm.
    torch.manual_seed(0)
    te_cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=CROSS, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    te = round_to(CLIPTextModel(te_cfg).eval(), torch.float16)
    save_component(te, os.path.join(MODEL, "text_encoder"), "model.safetensors", torch.float16, te_cfg.to_dict())
    ids = torch.tensor([meta["prompts"][0]["ids"]], dtype=torch.long)
    fixtures["text.input_ids"] = ids.to(torch.float32)
    fixtures["text.hidden"] = te(ids).last_hidden_state

    # UNets.
    gen = torch.Generator().manual_seed(1)
    sample = randn(gen, 1, 4, 8, 8)
    context = randn(gen, 1, 77, CROSS)
    fixtures["unet.sample"] = sample
    fixtures["unet.timestep"] = torch.tensor([759.0])
    fixtures["unet.encoder_hidden_states"] = context

    torch.manual_seed(2)
    cfg = unet_config(lcm=False)
    unet = round_to(UNet2DConditionModel(**cfg).eval(), torch.float16)
    save_component(unet, os.path.join(ROOT, "tiny-unet"), "diffusion_pytorch_model.safetensors", torch.float16, dict(unet.config))
    fixtures["unet.out"] = unet(sample, 759, encoder_hidden_states=context).sample
    kohya, peft = make_lora(unet, torch.Generator().manual_seed(3))
    save_file(kohya, os.path.join(ROOT, "lora-kohya.safetensors"))
    save_file(peft, os.path.join(ROOT, "lora-peft.safetensors"))
    fixtures["unet.lora_out"] = unet(sample, 759, encoder_hidden_states=context).sample

    torch.manual_seed(4)
    cfg = unet_config(lcm=True)
    unet = round_to(UNet2DConditionModel(**cfg).eval(), torch.float16)
    save_component(unet, os.path.join(MODEL, "unet"), "diffusion_pytorch_model.safetensors", torch.float16, dict(unet.config))
    w = torch.tensor([8.0 - 1.0])
    cond = guidance_embedding(w, 256)
    fixtures["lcm.w"] = w
    fixtures["lcm.timestep_cond"] = cond
    fixtures["unet_lcm.out"] = unet(sample, 759, encoder_hidden_states=context, timestep_cond=cond).sample

    # VAE (decoder checked), bf16 weights.
    torch.manual_seed(5)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], latent_channels=4,
                        norm_num_groups=32, layers_per_block=1, sample_size=16, scaling_factor=0.18215)
    vae = round_to(vae.eval(), torch.bfloat16)
    save_component(vae, os.path.join(MODEL, "vae"), "diffusion_pytorch_model.safetensors", torch.bfloat16, dict(vae.config))
    latents = randn(gen, 1, 4, 8, 8)
    fixtures["vae.latents"] = latents
    fixtures["vae.out"] = vae.decode(latents).sample

    # One full LCM loop (4 steps, guidance 8) with the noise given explicitly.
    sched = lcm_scheduler()
    os.makedirs(os.path.join(MODEL, "scheduler"), exist_ok=True)
    sched.save_config(os.path.join(MODEL, "scheduler"))
    sched.set_timesteps(4)
    fixtures["lcm.timesteps"] = sched.timesteps.to(torch.float32)
    prompt_embeds = fixtures["text.hidden"]
    x = randn(gen, 1, 4, 8, 8)
    fixtures["lcm.init"] = x
    denoised = None
    for k, t in enumerate(sched.timesteps):
        eps = unet(x, t, encoder_hidden_states=prompt_embeds, timestep_cond=cond).sample
        step_gen = torch.Generator().manual_seed(100 + k)
        fixtures[f"lcm.noise.{k}"] = randn(torch.Generator().manual_seed(100 + k), 1, 4, 8, 8)
        x, denoised = sched.step(eps, t, x, generator=step_gen, return_dict=False)
        fixtures[f"lcm.denoised.{k}"] = denoised
    fixtures["lcm.image"] = vae.decode(denoised / vae.config.scaling_factor).sample

    with open(os.path.join(MODEL, "model_index.json"), "w") as f:
        json.dump({"_class_name": "LatentConsistencyModelPipeline", "_diffusers_version": "0.42.1",
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "LCMScheduler"]}, f, indent=1)
    sdxl(fixtures, meta, tok, vocab_size)
    save_file({k: v.contiguous() for k, v in fixtures.items()}, os.path.join(ROOT, "parity.safetensors"))
    with open(os.path.join(ROOT, "parity.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    total = 0
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    print(f"fixtures written to {os.path.normpath(ROOT)}: {total / 1e6:.2f} MB")


def sdxl(fixtures, meta, tok, vocab_size):
    """Tiny SDXL-shaped models: two text encoders, text_time conditioning, a full LCM loop, a LoRA."""
    root = os.path.join(ROOT, "tiny-sdxl-lcm")
    for sub in ("tokenizer", "tokenizer_2"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            with open(os.path.join(MODEL, "tokenizer", f), "rb") as src, open(os.path.join(root, sub, f), "wb") as dst:
                dst.write(src.read())
    torch.manual_seed(10)
    common = dict(vocab_size=VOCAB, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                  pad_token_id=vocab_size - 1)
    cfg_l = CLIPTextConfig(hidden_size=32, hidden_act="quick_gelu", **common)
    cfg_g = CLIPTextConfig(hidden_size=48, hidden_act="gelu", projection_dim=40, **common)
    te1 = round_to(CLIPTextModel(cfg_l).eval(), torch.float16)
    te2 = round_to(CLIPTextModelWithProjection(cfg_g).eval(), torch.float16)
    save_component(te1, os.path.join(root, "text_encoder"), "model.safetensors", torch.float16, cfg_l.to_dict())
    save_component(te2, os.path.join(root, "text_encoder_2"), "model.safetensors", torch.float16, cfg_g.to_dict())
    ids = torch.tensor([meta["prompts"][0]["ids"]], dtype=torch.long)
    o1 = te1(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    pooled = o2.text_embeds
    fixtures["sdxl.context"] = context
    fixtures["sdxl.pooled"] = pooled

    torch.manual_seed(11)
    ucfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=80,
                attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], norm_num_groups=32,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=40 + 6 * 8, time_cond_proj_dim=256)
    unet = round_to(UNet2DConditionModel(**ucfg).eval(), torch.float16)
    save_component(unet, os.path.join(root, "unet"), "diffusion_pytorch_model.safetensors", torch.float16, dict(unet.config))
    gen = torch.Generator().manual_seed(12)
    sample = randn(gen, 1, 4, 8, 8)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    cond = guidance_embedding(torch.tensor([7.0]), 256)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    fixtures["sdxl.sample"] = sample
    fixtures["sdxl.time_ids"] = time_ids
    fixtures["sdxl.unet_out"] = unet(sample, 759, encoder_hidden_states=context, timestep_cond=cond,
                                     added_cond_kwargs=added).sample

    torch.manual_seed(13)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], latent_channels=4,
                        norm_num_groups=32, layers_per_block=1, sample_size=16, scaling_factor=0.13025)
    vae = round_to(vae.eval(), torch.bfloat16)
    save_component(vae, os.path.join(root, "vae"), "diffusion_pytorch_model.safetensors", torch.bfloat16, dict(vae.config))
    sched = lcm_scheduler()
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    sched.save_config(os.path.join(root, "scheduler"))
    sched.set_timesteps(4)
    x = randn(gen, 1, 4, 8, 8)
    fixtures["sdxl.lcm.init"] = x
    denoised = None
    for k, t in enumerate(sched.timesteps):
        eps = unet(x, t, encoder_hidden_states=context, timestep_cond=cond, added_cond_kwargs=added).sample
        fixtures[f"sdxl.lcm.noise.{k}"] = randn(torch.Generator().manual_seed(200 + k), 1, 4, 8, 8)
        x, denoised = sched.step(eps, t, x, generator=torch.Generator().manual_seed(200 + k), return_dict=False)
    fixtures["sdxl.lcm.denoised"] = denoised
    fixtures["sdxl.lcm.image"] = vae.decode(denoised / vae.config.scaling_factor).sample
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
                   "text_encoder": ["transformers", "CLIPTextModel"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "LCMScheduler"]}, f, indent=1)

    # An SDXL LoRA on the UNet and both text encoders (kohya names), merged by hand for the reference.
    gen = torch.Generator().manual_seed(14)
    kohya, rank, alpha, strength = {}, 4, 4.0, 0.7
    targets = [("lora_unet_", n, m) for n, m in unet.named_modules()
               if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n)]
    # transformers 5 names the tower's modules without `text_model.`; kohya keys always have it.
    tower = lambda model: [(n[len("text_model."):] if n.startswith("text_model.") else n, m)
                           for n, m in model.named_modules()]
    targets += [("lora_te1_", "text_model." + n, m) for n, m in tower(te1)
                if re.search(r"self_attn\.(q_proj|v_proj)$", n)]
    targets += [("lora_te2_", "text_model." + n, m) for n, m in tower(te2)
                if re.search(r"(self_attn\.k_proj|mlp\.fc1)$", n)]
    for prefix, name, m in targets:
        w = m.weight
        down = (randn(gen, rank, w.shape[1]) * 0.1).half().float()
        up = (randn(gen, w.shape[0], rank) * 0.1).half().float()
        w.data += strength * alpha / rank * (up @ down)
        k = prefix + name.replace(".", "_")
        kohya[k + ".lora_down.weight"] = down.half()
        kohya[k + ".lora_up.weight"] = up.half()
        kohya[k + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(kohya, os.path.join(ROOT, "lora-sdxl-kohya.safetensors"))
    o1 = te1(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    fixtures["sdxl.lora.context"] = context
    fixtures["sdxl.lora.pooled"] = o2.text_embeds
    fixtures["sdxl.lora.unet_out"] = unet(sample, 759, encoder_hidden_states=context, timestep_cond=cond,
                                          added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": time_ids}).sample


if __name__ == "__main__":
    main()
