"""
Tests for rewards.py on tiny random-weight stand-ins saved in the real on-disk formats (CLIPModel
snapshot + CLIPImageProcessor config + tokenizer files, the aesthetic MLP as a .pth state dict, the HPS
checkpoint as {"state_dict": ...} in open_clip's key layout), loaded through load_reward(name, path).

    python -m pytest tests/test_rewards.py     # the tests (~1 min on 2 CPU cores)
    python tests/test_rewards.py               # docs/rewards.md's figures: timing of every reward + JPEG Spearman
"""
import io, json, math, os, sys
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a green square", "an orange sunset over hills"]

# -----------------------------------------------------------------------------
# Tiny stand-ins in the real formats

def byte_alphabet():
    # CLIP's byte-level alphabet: {byte: printable unicode character}, in CLIP's order (printable bytes first)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return {b: chr(c) for b, c in zip(bs, cs)}

def bytes_to_unicode():
    return list(byte_alphabet().values())

def char_vocab():
    chars = bytes_to_unicode()  # "!" first: id 0, as in CLIP's vocabulary
    return {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}

def save_tokenizer(folder, pad_token=None):
    # Byte-level BPE without merges: every character is a token; end-of-text is the highest id, as in CLIP.
    # pad_token="!": the layout of the laion tokenizer files (and SD 2.x's, and SDXL's tokenizer_2).
    vocab = char_vocab()
    CLIPTokenizer(vocab=vocab, merges=[], **({"pad_token": pad_token} if pad_token else {})).save_pretrained(folder)
    return len(vocab)

def tiny_clip(folder, projection_dim=64, act="quick_gelu", seed=0, pad_token=None):
    # A 2-layer, width-32 CLIP at the real input size (224, patch 14), saved as a hub-style snapshot.
    os.makedirs(folder, exist_ok=True)
    vocab_size = save_tokenizer(folder, pad_token)
    torch.manual_seed(seed)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act=act)
    config = CLIPConfig(text_config=dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **layers),
                        vision_config=dict(image_size=224, patch_size=14, **layers), projection_dim=projection_dim)
    model = CLIPModel(config)
    with torch.no_grad():
        # Unit-gain weights instead of the 0.02 init, so features depend on the image's content, and,
        # as in real CLIP, a direction shared by image and text features, so cosines sit away from 0
        # (real ones are ~0.2-0.3) and a 1% relative tolerance means something.
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embedding" not in name:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
        model.text_projection.weight.copy_(model.visual_projection.weight)
        shared = torch.randn(32)
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_model.final_layer_norm.bias.copy_(shared)
    model.save_pretrained(folder)
    # the preprocessor config openai/clip-vit-large-patch14 (and laion's ViT-H-14) ships
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                       image_mean=list(rewards.OPENAI_MEAN), image_std=list(rewards.OPENAI_STD)).save_pretrained(folder)
    return model

def save_aesthetic_mlp(file, seed=0):
    torch.manual_seed(seed)
    mlp = rewards.aesthetic_mlp()
    with torch.no_grad():  # gain 3: scores of a few units, like the real predictor's (~4 to 7)
        for p in mlp.parameters():
            if p.dim() == 2:
                p.normal_(0, 3 / math.sqrt(p.shape[1]))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, file)  # keys as in the real .pth

def transformers_to_openclip(sd):
    # The inverse of rewards.openclip_to_transformers, written out key by key (open_clip's layout).
    out = {}
    for tower, pre in (("vision_model", "visual."), ("text_model", "")):
        layer_ids = sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"{tower}.encoder.layers.")})
        for i in layer_ids:
            a, b = f"{tower}.encoder.layers.{i}.", f"{pre}transformer.resblocks.{i}."
            for w in ("weight", "bias"):
                out[b + f"attn.in_proj_{w}"] = torch.cat([sd[a + f"self_attn.{n}_proj.{w}"] for n in "qkv"])
                out[b + f"attn.out_proj.{w}"] = sd[a + f"self_attn.out_proj.{w}"]
                out[b + f"ln_1.{w}"], out[b + f"ln_2.{w}"] = sd[a + f"layer_norm1.{w}"], sd[a + f"layer_norm2.{w}"]
                out[b + f"mlp.c_fc.{w}"], out[b + f"mlp.c_proj.{w}"] = sd[a + f"mlp.fc1.{w}"], sd[a + f"mlp.fc2.{w}"]
    for w in ("weight", "bias"):
        out[f"visual.ln_pre.{w}"] = sd[f"vision_model.pre_layrnorm.{w}"]
        out[f"visual.ln_post.{w}"] = sd[f"vision_model.post_layernorm.{w}"]
        out[f"ln_final.{w}"] = sd[f"text_model.final_layer_norm.{w}"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return out

IR_WORDS = ["a", "red", "circle", "on", "blue", "background", "photo", "of", "cat", "green", "square", "an",
            "orange", "sunset", "over", "hills"]

def save_imagereward(folder, width=64, text=32, seed=6):
    # ImageReward.pt in the published layout (BLIP's timm ViT "blip.visual_encoder.*", med BERT "blip.text_encoder.*",
    # "mlp.layers.*"), shrunk: ViT width 64 (one head of 64, as timm's ViTs), 2 blocks, patch 16 at 224 px; BERT
    # width 32, 2 layers, 4 heads; plus med_config.json and a BERT vocab.txt. Unit-gain random weights.
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/vocab.txt", "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *IR_WORDS]) + "\n")
    vocab = 5 + len(IR_WORDS) + 2   # + BLIP's [DEC] and [ENC]
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape: torch.randn(*shape, generator=g) / math.sqrt(shape[-1])
    b = lambda n: 0.1 * torch.randn(n, generator=g)
    sd = {"blip.visual_encoder.cls_token": torch.randn(1, 1, width, generator=g),
          "blip.visual_encoder.pos_embed": 0.5 * torch.randn(1, 197, width, generator=g),
          "blip.visual_encoder.patch_embed.proj.weight": w(width, 3, 16, 16) / 16,
          "blip.visual_encoder.patch_embed.proj.bias": b(width),
          "blip.visual_encoder.norm.weight": 1 + b(width), "blip.visual_encoder.norm.bias": b(width),
          "blip.vision_proj.weight": w(8, width), "blip.vision_proj.bias": b(8)}   # unused by ImageReward
    for i in range(2):
        p = f"blip.visual_encoder.blocks.{i}."
        sd.update({p + "norm1.weight": 1 + b(width), p + "norm1.bias": b(width), p + "attn.qkv.weight": w(3 * width, width),
                   p + "attn.qkv.bias": b(3 * width), p + "attn.proj.weight": w(width, width), p + "attn.proj.bias": b(width),
                   p + "norm2.weight": 1 + b(width), p + "norm2.bias": b(width), p + "mlp.fc1.weight": w(4 * width, width),
                   p + "mlp.fc1.bias": b(4 * width), p + "mlp.fc2.weight": w(width, 4 * width), p + "mlp.fc2.bias": b(width)})
    t = "blip.text_encoder."
    sd.update({t + "embeddings.word_embeddings.weight": torch.randn(vocab, text, generator=g),
               t + "embeddings.position_embeddings.weight": 0.5 * torch.randn(64, text, generator=g),
               t + "embeddings.LayerNorm.weight": 1 + b(text), t + "embeddings.LayerNorm.bias": b(text),
               t + "embeddings.position_ids": torch.arange(64)[None]})
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", text), ("crossattention", width)):
            sd.update({p + f"{att}.self.query.weight": w(text, text), p + f"{att}.self.query.bias": b(text),
                       p + f"{att}.self.key.weight": w(text, kv), p + f"{att}.self.key.bias": b(text),
                       p + f"{att}.self.value.weight": w(text, kv), p + f"{att}.self.value.bias": b(text),
                       p + f"{att}.output.dense.weight": w(text, text), p + f"{att}.output.dense.bias": b(text),
                       p + f"{att}.output.LayerNorm.weight": 1 + b(text), p + f"{att}.output.LayerNorm.bias": b(text)})
        sd.update({p + "intermediate.dense.weight": w(64, text), p + "intermediate.dense.bias": b(64),
                   p + "output.dense.weight": w(text, 64), p + "output.dense.bias": b(text),
                   p + "output.LayerNorm.weight": 1 + b(text), p + "output.LayerNorm.bias": b(text)})
    for k, (o, i) in zip((0, 2, 4, 6, 7), ((1024, text), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd[f"mlp.layers.{k}.weight"], sd[f"mlp.layers.{k}.bias"] = 2 * w(o, i), b(o)
    torch.save(sd, f"{folder}/ImageReward.pt")
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": text, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab, "encoder_width": 768,
           "add_cross_attention": True}   # encoder_width is overwritten by BLIP with the ViT's width
    with open(f"{folder}/med_config.json", "w") as f:
        json.dump(med, f)
    return folder

def build_all(root):
    # -> {name: path} for load_reward, every stand-in written under root
    paths = {}
    tiny_clip(f"{root}/aesthetic", projection_dim=768, seed=1)
    save_aesthetic_mlp(f"{root}/aesthetic/aesthetic-model.pth", seed=2)
    paths["aesthetic"] = f"{root}/aesthetic"
    paths["clip"] = f"{root}/clip"
    tiny_clip(paths["clip"], seed=3)
    paths["pickscore"] = f"{root}/pickscore"
    tiny_clip(paths["pickscore"], act="gelu", seed=4)
    # HPS: the folder holds the laion-style config + tokenizer and the open_clip-layout checkpoint
    model = tiny_clip(f"{root}/hps", act="gelu", seed=5, pad_token="!")  # the laion layout
    sd = {"module." + k: v.half() for k, v in transformers_to_openclip(model.state_dict()).items()}  # DDP prefix, fp16
    torch.save({"state_dict": sd}, f"{root}/hps/HPS_v2.1_compressed.pt")
    for f in ("model.safetensors", "preprocessor_config.json"):   # HPS weights come only from the .pt
        os.remove(f"{root}/hps/{f}")
    paths["hps"] = f"{root}/hps"
    paths["imagereward"] = save_imagereward(f"{root}/imagereward")
    return paths

@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_all(str(tmp_path_factory.mktemp("rewards")))

# -----------------------------------------------------------------------------
# Natural-looking images: smooth random fields + a gradient + a little texture, in [0, 1]

def natural_image(h, w, g):
    small = torch.rand(1, 3, 5, 7, generator=g)
    field = F.interpolate(small, (h, w), mode="bicubic", align_corners=False)[0]
    detail = F.interpolate(torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g), (h, w), mode="bilinear")[0]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = 0.55 * field + 0.25 * detail + 0.2 * (xx + yy)[None] / 2 + 0.03 * torch.randn(3, h, w, generator=g)
    return img.clamp(0, 1)

def to_pil(img):   # the reference route: uint8 PIL image, as a user's file would be
    return Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())

def quantised(img):  # the same uint8 values as to_pil, back as float, so both routes see the same pixels
    return (img * 255).round() / 255

SIZES = [(224, 224), (256, 256), (300, 200), (200, 360), (512, 384), (97, 150), (32, 32)]

# -----------------------------------------------------------------------------
# 1. Reference parity

def reference_clip_score(name, folder, img, prompt):
    # transformers' own route: PIL image -> CLIPImageProcessor -> the same weights, loaded independently
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=to_pil(img), return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels).pooler_output
        emb = emb / emb.norm(dim=-1, keepdim=True)
        if name == "aesthetic":
            mlp = rewards.aesthetic_mlp()
            mlp.load_state_dict({k.removeprefix("layers."): v for k, v in torch.load(f"{folder}/aesthetic-model.pth").items()})
            return mlp(emb).item()
        tok = CLIPTokenizer.from_pretrained(folder)(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.get_text_features(**tok).pooler_output
        cos = (emb * txt / txt.norm(dim=-1, keepdim=True)).sum().item()
        return model.logit_scale.exp().item() * cos if name == "pickscore" else cos

@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "clip"])
def test_clip_parity_with_image_processor(name, paths):
    reward = rewards.load_reward(name, paths[name])
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(SIZES):
        img = quantised(natural_image(h, w, g))
        ours = reward(img[None], [PROMPTS[i % 4]]).item()
        ref = reference_clip_score(name, paths[name], img, PROMPTS[i % 4])
        assert abs(ours - ref) <= 0.01 * abs(ref), (name, (h, w), ours, ref)

def test_clip_parity_can_fail(paths):
    # The check above is sensitive to preprocessing: squashing a non-square image to 224x224 instead of
    # resize + centre crop moves every score by more than the 1% tolerance.
    img = quantised(natural_image(300, 200, torch.Generator().manual_seed(1)))
    squashed = F.interpolate(img[None], (224, 224), mode="bicubic", antialias=True)
    for name in ("aesthetic", "pickscore", "clip"):
        ref = reference_clip_score(name, paths[name], img, PROMPTS[0])
        ours = rewards.load_reward(name, paths[name])(squashed, [PROMPTS[0]]).item()
        assert abs(ours - ref) > 0.01 * abs(ref), name

def resize_max_size_pil(img, size=224):
    # open_clip's ResizeMaxSize(224, fill=0) on a PIL image, then ToTensor + OpenAI mean/std (HPSv2's eval route)
    pil = to_pil(img)
    s = size / max(pil.height, pil.width)
    h, w = round(pil.height * s), round(pil.width * s)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(pil.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
    x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(rewards.OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(rewards.OPENAI_STD).view(1, 3, 1, 1)

@pytest.mark.parametrize("pad", [False, True])
def test_preprocess_matches_pil_pixels(pad, paths):
    # Pixel-level parity of our torch preprocessing with the PIL routes, in uint8 levels: the only gap
    # left is PIL's rounding of its output to uint8 (mean 0.25 level). A squash instead of crop/pad fails.
    processor = CLIPImageProcessor.from_pretrained(paths["clip"])
    ref_route = resize_max_size_pil if pad else lambda im: processor(images=to_pil(im), return_tensors="pt").pixel_values
    g = torch.Generator().manual_seed(2)
    levels = lambda a, b: (a - b).abs() * torch.tensor(rewards.OPENAI_STD).view(1, 3, 1, 1) * 255
    for h, w in SIZES + [(1000, 700), (33, 77)]:
        img = quantised(natural_image(h, w, g))
        ref = ref_route(img)
        d = levels(rewards.clip_preprocess(img[None], 224, pad=pad), ref)
        assert d.mean() < 0.4 and d.max() < 2.0, ((h, w), d.mean().item(), d.max().item())
        if h != w:
            squashed = rewards.clip_preprocess(F.interpolate(img[None], (224, 224), mode="bicubic", antialias=True), pad=pad)
            assert levels(squashed, ref).mean() > 2.0

# -----------------------------------------------------------------------------
# HPS: open_clip layout -> our mapping -> transformers CLIPModel, against a plain-torch open_clip forward

def openclip_blocks(sd, prefix, x, heads, causal):
    i = 0
    while f"{prefix}{i}.ln_1.weight" in sd:
        p = lambda name: sd[f"{prefix}{i}.{name}"]
        h = F.layer_norm(x, x.shape[-1:], p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in
                   F.linear(h, p("attn.in_proj_weight"), p("attn.in_proj_bias")).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).flatten(2)
        x = x + F.linear(a, p("attn.out_proj.weight"), p("attn.out_proj.bias"))
        h = F.layer_norm(x, x.shape[-1:], p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
        i += 1
    return x

def openclip_image_features(sd, pixels, heads=4):
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)     # (B, grid*grid, width)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = openclip_blocks(sd, "visual.transformer.resblocks.", x, heads, causal=False)
    return F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]

def openclip_text_features(sd, tokens, heads=4):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    x = openclip_blocks(sd, "transformer.resblocks.", x, heads, causal=True)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ sd["text_projection"]       # EOT has the highest id

def openclip_tokens(folder, prompt):
    ids = CLIPTokenizer.from_pretrained(folder)(prompt).input_ids                   # [SOT, ..., EOT]
    return torch.tensor([ids + [0] * (77 - len(ids))])                              # open_clip pads with 0

def test_hps_mapping_and_reference(paths):
    folder = paths["hps"]
    sd = {k.removeprefix("module."): v.float() for k, v in torch.load(f"{folder}/HPS_v2.1_compressed.pt")["state_dict"].items()}
    reward = rewards.load_reward("hps", folder)
    g = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate(SIZES):
        img, prompt = quantised(natural_image(h, w, g)), PROMPTS[i % 4]
        pixels = resize_max_size_pil(img)
        with torch.no_grad():
            ref_img, ref_txt = openclip_image_features(sd, pixels), openclip_text_features(sd, openclip_tokens(folder, prompt))
            ours_img = reward.model.get_image_features(pixel_values=pixels).pooler_output
            tok = reward.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt")
            ours_txt = reward.model.get_text_features(**tok).pooler_output
        torch.testing.assert_close(ours_img, ref_img, rtol=1e-4, atol=1e-4)        # same weights, same maths
        torch.testing.assert_close(ours_txt, ref_txt, rtol=1e-4, atol=1e-4)
        ref = F.cosine_similarity(ref_img, ref_txt).item()                          # HPS = cosine
        ours = reward(img[None], [prompt]).item()                                   # through our torch preprocessing
        assert abs(ours - ref) <= 0.01 * abs(ref), ((h, w), ours, ref)

def test_hps_strict_keys(paths, tmp_path):
    # every checkpoint key must be used and every model weight provided
    import shutil
    folder = shutil.copytree(paths["hps"], tmp_path / "hps")
    ckpt = torch.load(folder / "HPS_v2.1_compressed.pt")
    ckpt["state_dict"]["module.visual.extra_head.weight"] = torch.zeros(3)
    torch.save(ckpt, folder / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="unused.*extra_head"):
        rewards.load_reward("hps", str(folder))
    del ckpt["state_dict"]["module.visual.extra_head.weight"], ckpt["state_dict"]["module.ln_final.bias"]
    torch.save(ckpt, folder / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="missing.*final_layer_norm.bias"):
        rewards.load_reward("hps", str(folder))

def openclip_symbols(prompt):
    # open_clip's SimpleTokenizer, written out for a vocabulary without merges: clean (ftfy, html.unescape twice,
    # whitespace, lower case), split with its regex, map bytes to its alphabet, mark each word's last symbol </w>
    import html, ftfy, regex
    text = regex.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()).strip().lower()
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    alphabet = byte_alphabet()
    out = []
    for word in regex.findall(pattern, text, regex.IGNORECASE):
        chars = [alphabet[b] for b in word.encode("utf-8")]
        out += chars[:-1] + [chars[-1] + "</w>"]
    return out

TRICKY = ["NOISE!!! static", "Tom &amp; Jerry", "“quoted” words", "a ﬁne ﬂower", "ＦＵＬＬ width", "wow!"]

def test_hps_tokenises_as_open_clip(paths):
    """With the laion tokenizer layout (pad token "!"), prompts with "!", HTML entities, curly quotes, ligatures and
    full-width letters get open_clip's ids, and the scores equal a plain open_clip forward on those ids. Plain
    transformers tokenisation (every "!" split out as the pad token, no cleaning) gives other ids and scores."""
    folder = paths["hps"]
    reward = rewards.load_reward("hps", folder)
    sd = {k.removeprefix("module."): v.float() for k, v in torch.load(f"{folder}/HPS_v2.1_compressed.pt")["state_dict"].items()}
    vocab = char_vocab()
    img = quantised(natural_image(200, 300, torch.Generator().manual_seed(8)))
    with torch.no_grad():
        ref_img = openclip_image_features(sd, resize_max_size_pil(img))
    moved = 0
    for prompt in TRICKY:
        want = [vocab["<|startoftext|>"]] + [vocab[s] for s in openclip_symbols(prompt)] + [vocab["<|endoftext|>"]]
        got = reward.tokenizer([rewards.openclip_clean(prompt)], split_special_tokens=True).input_ids[0]
        assert got == want, (prompt, got, want)
        with torch.no_grad():
            ref = F.cosine_similarity(ref_img, openclip_text_features(sd, torch.tensor([want + [0] * (77 - len(want))]))).item()
            plain = reward.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
            wrong = F.cosine_similarity(ref_img, openclip_text_features(sd, plain)).item()
        ours = reward(img[None], [prompt]).item()
        assert abs(ours - ref) <= 0.01 * abs(ref), (prompt, ours, ref)
        moved += abs(wrong - ref) > 0.01 * abs(ref)
    assert moved >= len(TRICKY) - 1  # the old tokenisation misses on (nearly) every one of these prompts

# -----------------------------------------------------------------------------
# ImageReward: the published layout -> our mapping -> transformers' BLIP parts, against a plain-torch forward of the
# reference's maths (BLIP ViT + med BERT with cross-attention), with the reference's PIL/torchvision preprocessing

def torchvision_preprocess(img):
    # ImageReward's _transform(224): Resize(224, bicubic) on the PIL image, CenterCrop(224) (offset rounded),
    # ToTensor, CLIP mean/std
    pil = to_pil(img)
    w, h = pil.size
    nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    pil = pil.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    x = torch.from_numpy(np.array(pil.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(rewards.OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(rewards.OPENAI_STD).view(1, 3, 1, 1)

def attention(q, k, v, heads, mask=None):
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    a = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        a = a + (1 - mask[:, None, None, :].float()) * -1e4  # med's extended attention mask
    return (a.softmax(-1) @ v).transpose(1, 2).flatten(2)

def blip_reference_score(sd, pixels, ids, mask):
    p = lambda k: sd[k]
    ln = lambda x, k, eps: F.layer_norm(x, x.shape[-1:], p(k + ".weight"), p(k + ".bias"), eps)
    lin = lambda x, k: F.linear(x, p(k + ".weight"), p(k + ".bias"))
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, p(v + "patch_embed.proj.weight"), p(v + "patch_embed.proj.bias"), stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([p(v + "cls_token").expand(len(x), 1, -1), x], 1) + p(v + "pos_embed")
    for i in range(2):
        b = f"{v}blocks.{i}."
        q, k, vv = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(attention(q, k, vv, 1), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    h = ln(p(t + "embeddings.word_embeddings.weight")[ids] + p(t + "embeddings.position_embeddings.weight")[:ids.shape[1]],
           t + "embeddings.LayerNorm", 1e-12)
    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        for att, src, m in (("attention", h, mask), ("crossattention", image, None)):
            s = f"{b}{att}."
            out = attention(lin(h, s + "self.query"), lin(src, s + "self.key"), lin(src, s + "self.value"), 4, m)
            h = ln(lin(out, s + "output.dense") + h, s + "output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    z = h[:, 0]
    for k in (0, 2, 4, 6, 7):
        z = F.linear(z, p(f"mlp.layers.{k}.weight"), p(f"mlp.layers.{k}.bias"))
    return ((z.squeeze(-1) - rewards.IMAGEREWARD_MEAN) / rewards.IMAGEREWARD_STD).item()

def test_imagereward_mapping_and_reference(paths):
    from transformers import BertTokenizer
    folder = paths["imagereward"]
    sd = torch.load(f"{folder}/ImageReward.pt")
    reward = rewards.load_reward("imagereward", folder)
    tok = BertTokenizer(f"{folder}/vocab.txt")
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    g = torch.Generator().manual_seed(9)
    scores, misses = [], 0
    for i, (h, w) in enumerate(SIZES):  # (200, 360): 179 px to crop, torchvision's offset 90 where floor gives 89
        img, prompt = quantised(natural_image(h, w, g)), PROMPTS[i % 4]
        t = tok([prompt], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            ref = blip_reference_score(sd, torchvision_preprocess(img), t.input_ids, t.attention_mask)
            squashed = reward(F.interpolate(img[None], (224, 224), mode="bicubic", antialias=True), [prompt]).item()
        ours = reward(img[None], [prompt]).item()
        assert abs(ours - ref) <= 0.01 * max(1.0, abs(ref)), ((h, w), ours, ref)
        misses += h != w and abs(squashed - ref) > 0.01 * max(1.0, abs(ref))
        scores.append(ours)
    assert misses >= 3 and max(scores) - min(scores) > 1  # a wrong preprocessing fails; the scores are not flat

def test_imagereward_strict_keys(paths, tmp_path):
    import shutil
    folder = shutil.copytree(paths["imagereward"], tmp_path / "ir")
    sd = torch.load(folder / "ImageReward.pt")
    sd["blip.extra.weight"] = torch.zeros(2)
    torch.save(sd, folder / "ImageReward.pt")
    with pytest.raises(ValueError, match="unused.*blip.extra"):
        rewards.load_reward("imagereward", str(folder))
    del sd["blip.extra.weight"], sd["blip.visual_encoder.norm.bias"]
    torch.save(sd, folder / "ImageReward.pt")
    with pytest.raises(ValueError, match="missing.*post_layernorm.bias"):
        rewards.load_reward("imagereward", str(folder))

# -----------------------------------------------------------------------------
# 2. Gradients reach the images, never the reward networks

@pytest.mark.parametrize("name", list(rewards.REWARDS))
def test_gradients(name, paths):
    reward = rewards.load_reward(name, paths.get(name))
    g = torch.Generator().manual_seed(4)
    for h, w in [(32, 32), (40, 72)]:
        x = torch.stack([natural_image(h, w, g) for _ in range(2)]).requires_grad_(True)
        r = reward(x, PROMPTS[:2])
        assert r.shape == (2,) and r.dtype == torch.float32
        r.sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())

@pytest.mark.parametrize("name", list(rewards.REWARDS))
def test_forward_and_backward_on_meta(name, paths, monkeypatch):
    """Every reward with its network on the meta device (the tests' stand-in for a GPU, test_devices.py) and meta
    images: a constant the reward makes on the CPU (CLIP's mean and std, the JPEG tables, the tokens, BLIP's image
    mask) would fail here, as it fails on CUDA. transformers asks whether a padding mask is all ones, to skip it: a
    data-dependent check that a GPU answers with a sync and meta cannot answer; here it gets "no" (the full mask)."""
    import transformers.masking_utils as masking
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)
    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", lambda *args, **kwargs: False)
    reward = rewards.load_reward(name, paths.get(name), device="meta")
    assert {p.device.type for p in reward.parameters()} <= {"meta"}
    x = torch.rand(2, 3, 40, 72).to("meta").requires_grad_(True)
    r = reward(x, PROMPTS[:2])
    r.sum().backward()
    assert r.shape == (2,) and r.device.type == "meta" and x.grad.device.type == "meta"


def test_compute_dtype(paths):
    # a frozen tower runs in the dtype it was given and still returns float32 scores with a graph
    reward = rewards.load_reward("clip", paths["clip"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reward.model.parameters())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    r = reward(x, PROMPTS[:2])
    r.sum().backward()
    assert r.dtype == torch.float32 and x.grad.abs().sum() > 0

def test_bf16_towers_keep_heads_and_scales_in_fp32(paths):
    """PickScore's scale is exp of the fp32 logit_scale (bf16 would round it), heads stay fp32 in bf16 runs."""
    raw = CLIPModel.from_pretrained(paths["pickscore"]).logit_scale.item()   # fp32, from the file
    pick = rewards.load_reward("pickscore", paths["pickscore"], dtype=torch.bfloat16)
    assert pick.scale == math.exp(raw) and pick.scale != math.exp(torch.tensor(raw).bfloat16().item())
    aesthetic = rewards.load_reward("aesthetic", paths["aesthetic"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in aesthetic.head.parameters())
    assert all(p.dtype == torch.bfloat16 for p in aesthetic.model.vision_model.parameters())
    ir = rewards.load_reward("imagereward", paths["imagereward"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in ir.head.parameters())
    assert dtype_figures(paths, n=4, names=["pickscore"])["pickscore"]["max_abs"] < 1  # 100x cosine; 0.05 here

def dtype_figures(paths, n=16, size=(256, 256), names=("aesthetic", "hps", "pickscore", "clip", "imagereward")):
    """Each reward with bf16 towers (heads, normalisation, cosine and scale in fp32) against all-fp32, on n natural
    images: {name: {"max_abs": largest |bf16 - fp32|, "spread": std of the fp32 scores}}."""
    g = torch.Generator().manual_seed(11)
    x = torch.stack([quantised(natural_image(*size, g)) for _ in range(n)])
    prompts = [PROMPTS[k % 4] for k in range(n)]
    out = {}
    for name in names:
        with torch.no_grad():
            s32 = rewards.load_reward(name, paths.get(name))(x, prompts)
            s16 = rewards.load_reward(name, paths.get(name), dtype=torch.bfloat16)(x, prompts)
        out[name] = {"max_abs": (s16 - s32).abs().max().item(), "spread": s32.std().item(), "mean": s32.mean().item()}
    return out

# -----------------------------------------------------------------------------
# Failure paths: one line, naming the fix

def test_unknown_name():
    with pytest.raises(ValueError) as e:
        rewards.check_reward_name("aesthetics")
    assert "\n" not in str(e.value) and "known rewards: aesthetic, hps" in str(e.value)
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.load_reward("nope")

@pytest.mark.parametrize("name", ["aesthetic", "hps", "pickscore", "clip", "imagereward"])
def test_missing_weights(name, paths, tmp_path):
    with pytest.raises(ValueError) as e:
        rewards.load_reward(name, str(tmp_path / "not_there"))
    msg = str(e.value)
    assert "\n" not in msg and f"reward '{name}': cannot load" in msg and f"--reward_path {name}=" in msg, msg

@pytest.mark.parametrize("name", ["aesthetic", "hps", "imagereward", "clip"])
def test_damaged_weights_are_one_line_and_left_as_they_were(name, paths, tmp_path):
    """A truncated checkpoint (or CLIP snapshot): one line naming the reward and the fix; the file is not touched."""
    import shutil
    folder = shutil.copytree(paths[name], tmp_path / name)
    target = {"aesthetic": "aesthetic-model.pth", "hps": "HPS_v2.1_compressed.pt", "imagereward": "ImageReward.pt",
              "clip": "model.safetensors"}[name]
    data = (folder / target).read_bytes()[:300]
    (folder / target).write_bytes(data)
    with pytest.raises(ValueError) as e:
        rewards.load_reward(name, str(folder))
    msg = str(e.value)
    assert "\n" not in msg and f"reward '{name}': cannot load" in msg and f"--reward_path {name}=" in msg, msg
    assert (folder / target).read_bytes() == data

def test_hps_folder_without_checkpoint(paths, tmp_path):
    import shutil
    folder = shutil.copytree(paths["hps"], tmp_path / "hps")
    os.remove(folder / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="HPS_v2.1_compressed.pt.*--reward_path hps="):
        rewards.load_reward("hps", str(folder))

def test_weight_free_rejects_path():
    with pytest.raises(ValueError, match="has no weights"):
        rewards.load_reward("brightness", "/some/file")

# -----------------------------------------------------------------------------
# Weight-free rewards: their documented ranges on extreme images

def test_toy_reward_ranges():
    flat = lambda r, g, b: torch.tensor([r, g, b], dtype=torch.float).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    half = torch.cat([flat(0, 0, 0)[..., :16], flat(1, 1, 1)[..., 16:]], -1)
    score = lambda name, x: rewards.load_reward(name)(x, [""]).item()
    assert score("brightness", flat(1, 1, 1)) == pytest.approx(1) and score("brightness", flat(0, 0, 0)) == 0
    assert score("saturation", flat(1, 1, 0)) == pytest.approx(1) and score("saturation", flat(.5, .5, .5)) == 0
    assert score("brightness", flat(1, 1, 0)) == pytest.approx(0.886)          # yellow: bright and saturated
    assert score("contrast", half) == pytest.approx(1) and score("contrast", flat(1, 0, 0)) == 0
    assert score("warmth", flat(1, 0, 0)) == 1 and score("warmth", flat(0, 0, 1)) == -1
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert -0.01 < score("compressibility", flat(.3, .6, .2)) <= 0 and score("incompressibility", noise) > 1.0

# -----------------------------------------------------------------------------
# 3. compressibility vs real JPEG sizes

def jpeg_size(img, quality=95):
    buf = io.BytesIO()
    to_pil(img).save(buf, format="JPEG", quality=quality)                       # PIL default: 4:2:0
    return buf.tell()

def varied_image(i, g):
    # procedural shapes, gradients, noise, smooth photo-like fields, sinusoid textures, field + grain
    h, w = (int(v) for v in torch.randint(64, 129, (2,), generator=g))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rand = lambda *s: torch.rand(*s, generator=g)
    kind = i % 6
    if kind == 0:
        img = rand(3, 1, 1).expand(3, h, w).clone()
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            cx, cy, r = rand(3)
            img[:, ((xx - cx) ** 2 + (yy - cy) ** 2) < (0.1 + 0.3 * r) ** 2] = rand(3, 1)
    elif kind == 1:
        a, b, t = rand(3, 1, 1), rand(3, 1, 1), rand(1)
        img = a + (b - a) * (t * xx + (1 - t) * yy)
    elif kind == 2:
        img = rand(3, 1, 1) + float(rand(1)) ** 2 * (rand(3, h, w) - 0.5)
    elif kind == 3:
        img = natural_image(h, w, g)
    elif kind == 4:
        img = 0.5 + sum(rand(3, 1, 1) * torch.sin(2 * math.pi * ((2 + 30 * rand(1)) * xx + (2 + 30 * rand(1)) * yy) + 6.3 * rand(1))
                        for _ in range(3)) / 6
    else:
        img = natural_image(h, w, g) + 0.1 * float(rand(1)) * torch.randn(3, h, w, generator=g)
    return quantised(img.clamp(0, 1))

def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm())).item()

def compressibility_figures(n=240):
    g = torch.Generator().manual_seed(0)
    imgs = [varied_image(i, g) for i in range(n)]
    pixels = torch.tensor([im.shape[1] * im.shape[2] for im in imgs], dtype=torch.float64)
    real = torch.tensor([jpeg_size(im) for im in imgs], dtype=torch.float64)
    est = torch.cat([rewards.jpeg_bytes_per_pixel(im[None]) for im in imgs]).double()   # bytes/pixel
    header = jpeg_size(torch.zeros(3, 8, 8)) - 1   # PIL q95 header + tables, about 630 bytes
    return dict(n=n, rho_per_pixel=spearman(est, real / pixels), rho_total=spearman(est * pixels, real),
                ratio=((real - header) / (est * pixels)).median().item())

def test_compressibility_spearman():
    f = compressibility_figures()
    assert f["rho_per_pixel"] >= 0.9 and f["rho_total"] >= 0.9, f

def test_compressibility_ascent_shrinks_jpeg():
    # the gradient is useful, not just non-zero: 30 ascent steps make the real JPEG file smaller
    x = varied_image(5, torch.Generator().manual_seed(6)).clone().requires_grad_(True)   # smooth field + grain
    reward, before = rewards.load_reward("compressibility"), jpeg_size(x.detach())
    for _ in range(30):
        reward(x[None], [""]).sum().backward()
        with torch.no_grad():
            x += 0.01 * x.grad / x.grad.abs().mean()   # normalised step, ~2.5 uint8 levels
            x.clamp_(0, 1)
            x.grad = None
    assert jpeg_size(x.detach()) < 0.8 * before

# -----------------------------------------------------------------------------
def cost_table(paths, batch=4, sizes=(32, 512), repeats=5):
    """One forward + backward to the images, median of `repeats` after a warm-up, per reward (docs/rewards.md)."""
    import time
    print("| reward | params | " + " | ".join(f"fwd+bwd {s}x{s}, B={batch}" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for name in rewards.REWARDS:
        reward, times = rewards.load_reward(name, paths.get(name)), []
        for s in sizes:
            x, runs = torch.rand(batch, 3, s, s, requires_grad=True), []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                reward(x, PROMPTS[:batch]).sum().backward()
                runs.append(time.perf_counter() - t0)
            times.append(sorted(runs[1:])[repeats // 2])
        params = sum(p.numel() for p in reward.parameters())
        print(f"| {name} | {params:,} | " + " | ".join(f"{1000 * t:.1f} ms" for t in times) + " |")


if __name__ == "__main__":
    # docs/rewards.md's figures: timing of every reward on the tiny stand-ins, bf16 against fp32, then the JPEG-size
    # rank correlation
    import tempfile
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        found = build_all(root)
        cost_table(found)
        print("bf16 towers + fp32 heads against fp32, 16 images of 256x256:")
        for name, v in dtype_figures(found).items():
            print(f"  {name}: max |bf16 - fp32| {v['max_abs']:.2e}, fp32 mean {v['mean']:.4g}, spread {v['spread']:.3g}")
    print("compressibility vs PIL JPEG q95:", compressibility_figures())
