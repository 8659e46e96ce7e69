"""
Differentiable rewards for rid. Every reward is a frozen nn.Module with one signature:

    reward(images, prompts) -> (B,) float32, images float in [0, 1] of shape (B, 3, H, W), higher is better,

differentiable with respect to the images (any H, W). Preprocessing is pure torch on the tensor (bicubic
with antialias, crop or pad as the reference does, CLIP mean/std), so the graph reaches the pixels; the
references' processors go through PIL/uint8 and would cut it. See docs/rewards.md.

    from rewards import load_reward
    reward = load_reward("aesthetic")                        # weights from the hub
    reward = load_reward("hps", path="/path/to/HPS_v2.1_compressed.pt")   # or a local copy
    scores = reward(images, prompts)                        # (B,) float32, keeps the graph to `images`

What `path` means for each reward is written at the top of its load_* function below. What a reward costs:
    python bench.py --model sd15-arch --phases reward --reward hps --reward_path hps=/path/to/HPS_v2.1_compressed.pt
"""
import json, math, os, pickle
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

# -----------------------------------------------------------------------------
# Pure-torch image preprocessing (produces the (B, 3, 224, 224) normalised CLIP input)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

def clip_preprocess(images, size=224, pad=False, round_crop=False):
    # images (B, 3, H, W) in [0, 1], any dtype; computed in fp32 (cheap, and bicubic+antialias wants it).
    # pad=False: CLIPImageProcessor (openai, PickScore): short side to `size` (long side int()-truncated,
    #   as transformers' get_resize_output_image_size), centre crop with top=(h-size)//2; round_crop=True:
    #   torchvision's Resize + CenterCrop (ImageReward), the same resize, top=int(round((h-size)/2)).
    # pad=True: open_clip's ResizeMaxSize (HPSv2 eval): long side to `size` (short side round()ed), then
    #   pad to a square with fill 0 (black, before normalising), left/top = pad//2.
    x = images.float()
    H, W = x.shape[-2:]
    if pad:
        s = size / max(H, W)
        h, w = round(H * s), round(W * s)
    else:
        h, w = (int(size * H / W), size) if W <= H else (size, int(size * W / H))
    # torch's antialiased bicubic uses PIL's kernel (a = -0.5) and PIL's support scaling when shrinking
    x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)  # PIL clamps bicubic overshoot to uint8 range; we match it (no grad on overshoot)
    if pad:
        ph, pw = size - h, size - w
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    else:
        offset = (lambda d: int(round(d / 2))) if round_crop else (lambda d: d // 2)
        top, left = offset(h - size), offset(w - size)
        x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

# -----------------------------------------------------------------------------
# CLIP-based rewards: one module, four flavours (aesthetic MLP head, cosine, scaled cosine, padded input)

def openclip_clean(text):
    # open_clip's text cleaning before BPE (HPSv2 scores with open_clip's tokenizer): ftfy.fix_text (curly quotes,
    # ligatures, full-width letters, mojibake), html.unescape twice, whitespace collapsed, lower case.
    import html, re, ftfy
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()

class CLIPReward(nn.Module):
    def __init__(self, model, tokenizer=None, head=None, pad=False, scaled=False, openclip_text=False,
                 dtype=torch.float32):
        # model: a transformers CLIPModel loaded in fp32; its towers then run in `dtype` (the compute dtype), while
        # the head, the normalisation, the cosine and the scale stay in fp32, so that a score depends on the compute
        # dtype only as much as the towers make it (bf16 would round PickScore's scale exp(4.6052) = 100 to 98.9).
        super().__init__()
        self.scale = math.exp(model.logit_scale.item()) if scaled else None  # read in fp32, before the cast
        self.model, self.tokenizer = model.to(dtype), tokenizer
        self.head = head.float() if head is not None else None            # aesthetic: the MLP head, fp32
        self.pad = pad                                                     # HPS pads instead of cropping
        # HPS tokenises as open_clip does: cleaned text, and "!" always text. The laion tokenizer files name "!"
        # (id 0, open_clip's padding) the pad token, and transformers would split every "!" of a prompt out as
        # that special token; split_special_tokens=True keeps open_clip's merges ("!!!" is one word).
        self.openclip_text = openclip_text
        self.dtype = dtype                                                 # compute dtype of the frozen towers

    def forward(self, images, prompts):
        size = self.model.config.vision_config.image_size
        x = clip_preprocess(images, size, self.pad).to(self.dtype)                    # (B, 3, 224, 224)
        img = self.model.get_image_features(pixel_values=x).pooler_output.float()     # (B, D), fp32 from here on
        img = F.normalize(img, dim=-1)
        if self.head is not None:                            # aesthetic: MLP on the L2-normalised embedding
            return self.head(img).squeeze(-1)
        # Text side is not differentiated: no_grad here is safe, the image side above keeps its graph.
        text = [openclip_clean(p) for p in prompts] if self.openclip_text else list(prompts)
        tok = self.tokenizer(text, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings,  # 77 tokens
                             split_special_tokens=self.openclip_text)
        with torch.no_grad():
            txt = self.model.get_text_features(input_ids=tok.input_ids.to(x.device),
                                               attention_mask=tok.attention_mask.to(x.device)).pooler_output
        score = (img * F.normalize(txt.float(), dim=-1)).sum(-1)  # cosine, (B,)
        return score * self.scale if self.scale else score     # PickScore: logit_scale.exp() * cosine (~100x)

def aesthetic_mlp(width=768):
    # LAION aesthetic predictor v2 head (improved-aesthetic-predictor): 768-1024-128-64-16-1, no activations; the
    # same head scores ImageReward's text feature. The originals have Dropout at indices 1, 3, 5; Identity keeps
    # the checkpoints' keys (layers.0/2/4/6/7).
    return nn.Sequential(nn.Linear(width, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
                         nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1))

def openclip_to_transformers(sd):
    # open_clip (OpenAI CLIP layout) state dict -> transformers CLIPModel keys, the same renames as
    # transformers' convert_clip_original_pytorch_to_hf.py. Unknown keys pass through unchanged, so the
    # strict key check in load_hps reports them.
    prefixes = [("visual.conv1.", "vision_model.embeddings.patch_embedding."),
                ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
                ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
                ("visual.ln_pre.", "vision_model.pre_layrnorm."),   # sic, transformers' spelling
                ("visual.ln_post.", "vision_model.post_layernorm."),
                ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
                ("token_embedding.", "text_model.embeddings.token_embedding."),
                ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                ("transformer.resblocks.", "text_model.encoder.layers."),
                ("ln_final.", "text_model.final_layer_norm.")]
    parts = [(".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".attn.out_proj.", ".self_attn.out_proj."),
             (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")                       # checkpoints saved from DDP
        if k in ("visual.proj", "text_projection"):         # open_clip: x @ proj (width, dim); Linear: (dim, width)
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t()
            continue
        for old, new in prefixes:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        for old, new in parts:
            k = k.replace(old, new)
        if ".attn.in_proj_" in k:                           # nn.MultiheadAttention packs q, k, v along dim 0
            for n, part in zip("qkv", v.chunk(3, dim=0)):
                out[k.replace(".attn.in_proj_", f".self_attn.{n}_proj.")] = part
        else:
            out[k] = v
    return out

# -----------------------------------------------------------------------------
# Loaders: name -> module. `path` is the one local override per reward; hub ids are the defaults.
LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"   # HPS architecture config + tokenizer; PickScore tokenizer
CLIP_L14 = "openai/clip-vit-large-patch14"

def _hub_file(repo, filename):
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo, filename)

# hub, missing file, bad pickle, damaged safetensors, a file that holds something else (wrong keys or type)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError, AttributeError, KeyError,
               TypeError, EOFError)

def _load_error(name, what, err, hint):
    chain, e = set(), err  # transformers wraps the hub's own errors in OSError: look at the causes too
    while e is not None and len(chain) < 8:
        chain.add(type(e).__name__)
        e = e.__cause__ or e.__context__
    why = ("the hub cannot be reached and it is not in the local cache" if chain & {"LocalEntryNotFoundError",
           "OfflineModeIsEnabled"} else "the hub has no such repository or file" if chain & {
           "RepositoryNotFoundError", "GatedRepoError", "RemoteEntryNotFoundError"} else
           f"{type(err).__name__}: missing, unreadable or not the expected file")
    return ValueError(f"reward {name!r}: cannot load {what} ({why}); pass a local copy with --reward_path {name}={hint}")

def load_aesthetic(path, device, dtype, name="aesthetic"):
    # path: a folder with a CLIP snapshot (config.json + weights) and aesthetic-model.pth, or just the .pth file
    # (CLIP ViT-L/14 then comes from the hub). The head's width is the CLIP's embedding width (768 for ViT-L/14).
    from transformers import CLIPModel
    folder = path if path and os.path.isdir(path) else None
    pth = os.path.join(folder, "aesthetic-model.pth") if folder else path
    try:
        model = CLIPModel.from_pretrained(folder or CLIP_L14, dtype=torch.float32)  # CLIPReward casts the tower
        sd = torch.load(pth or _hub_file("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
                        map_location="cpu", weights_only=True)  # the file is a plain MLP state dict
        head = aesthetic_mlp(model.config.projection_dim)
        head.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()})  # strict
    except LOAD_ERRORS as e:
        raise _load_error(name, f"{folder or CLIP_L14} + {pth or 'trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth'}",
                          e, "/path/to/folder (CLIP snapshot + aesthetic-model.pth)") from None
    return CLIPReward(model, head=head, dtype=dtype).to(device)

def load_hps(path, device, dtype):
    # HPSv2.1 = open_clip ViT-H-14 fine-tuned; held in transformers' CLIPModel after a key mapping.
    # path: the HPS_v2.1_compressed.pt file (config + tokenizer from the hub), or a folder holding it
    # together with the config.json and tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    folder = path if path and os.path.isdir(path) else None
    ckpt = os.path.join(folder, "HPS_v2.1_compressed.pt") if folder else path
    try:
        config = CLIPConfig.from_pretrained(folder or LAION_H14)
        tokenizer = AutoTokenizer.from_pretrained(folder or LAION_H14)
        sd = torch.load(ckpt or _hub_file("xswu/HPSv2", "HPS_v2.1_compressed.pt"), map_location="cpu", weights_only=True)
        sd = openclip_to_transformers(sd.get("state_dict", sd))   # HPSv2 saves {"state_dict": ...}
    except LOAD_ERRORS as e:
        raise _load_error("hps", f"{ckpt or 'xswu/HPSv2/HPS_v2.1_compressed.pt'} (config+tokenizer: {folder or LAION_H14})",
                          e, "/path/to/HPS_v2.1_compressed.pt") from None
    # from_pretrained(None, state_dict=...) skips the random init of ~1B parameters; strictness is ours:
    model = CLIPModel.from_pretrained(None, config=config, state_dict=sd, dtype=torch.float32)
    missing, unused = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
    if missing or unused:
        raise ValueError(f"reward 'hps': checkpoint {ckpt} does not match ViT-H-14: missing {sorted(missing)[:5]}, "
                         f"unused {sorted(unused)[:5]}")
    return CLIPReward(model, tokenizer, pad=True, openclip_text=True, dtype=dtype).to(device)

def load_clip_like(name, default_id, default_tok, scaled):
    # path: a folder with a transformers CLIPModel snapshot; its tokenizer files if it has them.
    def load(path, device, dtype):
        from transformers import AutoTokenizer, CLIPModel
        tok_src = path if path and os.path.exists(os.path.join(path, "tokenizer_config.json")) else default_tok
        try:
            model = CLIPModel.from_pretrained(path or default_id, dtype=torch.float32)  # CLIPReward casts the towers
            tokenizer = AutoTokenizer.from_pretrained(tok_src)
        except LOAD_ERRORS as e:
            raise _load_error(name, f"{path or default_id} (tokenizer: {tok_src})", e, "/path/to/folder") from None
        return CLIPReward(model, tokenizer, scaled=scaled, dtype=dtype).to(device)
    return load

# -----------------------------------------------------------------------------
# ImageReward (Xu et al. 2023, the reward of ReFL): BLIP's ViT image encoder, a BERT text encoder that cross-attends to
# the image tokens, the [CLS] feature through an MLP 768-1024-128-64-16-1, then the published standardisation.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072   # ImageReward.py's self.mean, self.std

class BLIPReward(nn.Module):
    def __init__(self, vision, text, tokenizer, head):
        super().__init__()
        self.vision, self.text, self.tokenizer, self.head = vision, text, tokenizer, head
        self.dtype = next(vision.parameters()).dtype

    def forward(self, images, prompts):
        # torchvision's Resize(224, bicubic) + CenterCrop(224) (offset rounded), CLIP mean/std, as the reference
        x = clip_preprocess(images, self.vision.config.image_size, round_crop=True).to(self.dtype)
        img = self.vision(pixel_values=x).last_hidden_state                      # (B, 1 + patches, vision width)
        # 35 tokens, [CLS] first, as ImageReward.score; the text side keeps its graph (it attends to the image)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        ones = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        out = self.text(input_ids=tok.input_ids.to(img.device), attention_mask=tok.attention_mask.to(img.device),
                        encoder_hidden_states=img, encoder_attention_mask=ones, is_decoder=False)  # bidirectional
        score = self.head(out.last_hidden_state[:, 0].float()).squeeze(-1)       # the head runs in fp32, as the reference
        return (score - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

def imagereward_to_transformers(sd):
    # ImageReward.pt (BLIP's timm-style ViT "blip.visual_encoder.*", med BERT "blip.text_encoder.*", "mlp.layers.*")
    # -> transformers' BlipVisionModel, BlipTextModel and the MLP head. Our own mapping; unknown keys are reported.
    vision, text, head, unused = {}, {}, {}, []
    parts = [(".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
             (".attn.proj.", ".self_attn.projection.")]
    for k, v in sd.items():
        if k.startswith("blip.text_encoder."):
            if not k.endswith("position_ids"):                                   # a buffer, rebuilt by transformers
                text[k.removeprefix("blip.text_encoder.")] = v
        elif k.startswith("mlp.layers."):
            head[k.removeprefix("mlp.layers.")] = v
        elif k.startswith("blip.visual_encoder."):
            k = k.removeprefix("blip.visual_encoder.")
            k = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                 "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                 "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}.get(k, k)
            if k.startswith("blocks."):
                k = "encoder.layers." + k.removeprefix("blocks.")
                for old, new in parts:
                    k = k.replace(old, new)
            vision[k] = v
        elif not k.startswith(("blip.vision_proj.", "blip.text_proj.")):         # BLIP's contrastive heads: unused
            unused.append(k)
    return vision, text, head, unused

def load_imagereward(path, device, dtype):
    # path: a folder with ImageReward.pt, med_config.json and (optionally) the bert-base-uncased tokenizer files,
    # or just the .pt file (med_config.json from THUDM/ImageReward, the tokenizer from bert-base-uncased).
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    folder = path if path and os.path.isdir(path) else None
    ckpt = os.path.join(folder, "ImageReward.pt") if folder else path
    tok_src = folder if folder and os.path.isfile(os.path.join(folder, "vocab.txt")) else "bert-base-uncased"
    try:
        sd = torch.load(ckpt or _hub_file("THUDM/ImageReward", "ImageReward.pt"), map_location="cpu", weights_only=True)
        med = os.path.join(folder, "med_config.json") if folder else _hub_file("THUDM/ImageReward", "med_config.json")
        with open(med) as f:
            med = json.load(f)
        tokenizer = BertTokenizer.from_pretrained(tok_src)
        vision_sd, text_sd, head_sd, unused = imagereward_to_transformers(sd.get("state_dict", sd))
    except LOAD_ERRORS as e:
        raise _load_error("imagereward", f"{ckpt or 'THUDM/ImageReward/ImageReward.pt'} (+ med_config.json, tokenizer: "
                          f"{tok_src})", e, "/path/to/folder (ImageReward.pt + med_config.json)") from None
    # BLIP's tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC], ids 30522 and 30523 (blip.init_tokenizer)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    width = vision_sd["embeddings.class_embedding"].shape[-1]                   # 1024: BLIP's ViT-L/16
    patch = vision_sd["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision_sd["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision_config = BlipVisionConfig(                                          # the shapes, read off the checkpoint
        hidden_size=width, intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers.")),
        num_attention_heads=max(1, width // 64), image_size=grid * patch, patch_size=patch,   # timm ViTs: heads of 64
        layer_norm_eps=1e-6, hidden_act="gelu")                                 # timm's LayerNorm eps and exact GELU
    text_config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
        hidden_act=med["hidden_act"], pad_token_id=med.get("pad_token_id", 0), encoder_hidden_size=width,
        bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
        is_decoder=True)                                                        # is_decoder: the cross-attention layers
    vision = BlipVisionModel.from_pretrained(None, config=vision_config, state_dict=vision_sd, dtype=dtype)
    text = BlipTextModel.from_pretrained(None, config=text_config, state_dict=text_sd, dtype=dtype,
                                         add_pooling_layer=False)
    problems = {"vision": (set(vision.state_dict()) - set(vision_sd), set(vision_sd) - set(vision.state_dict())),
                "text": ({k for k in text.state_dict() if not k.endswith("position_ids")} - set(text_sd),
                         set(text_sd) - set(text.state_dict()))}
    missing = sorted(k for m, _ in problems.values() for k in m)
    extra = sorted(unused + [k for _, u in problems.values() for k in u])
    if missing or extra:
        raise ValueError(f"reward 'imagereward': checkpoint {ckpt} does not match BLIP: missing {missing[:5]}, "
                         f"unused {extra[:5]}")
    head = aesthetic_mlp(head_sd["0.weight"].shape[1])  # 768-1024-128-64-16-1, keys layers.0/2/4/6/7
    head.load_state_dict(head_sd)  # strict
    return BLIPReward(vision, text, tokenizer, head.float()).to(device)

# -----------------------------------------------------------------------------
# compressibility: a differentiable estimate of the JPEG (quality 95, 4:2:0, PIL's default) file size.
# Blockwise 8x8 DCT of YCbCr, divided by the quality-scaled quantisation tables; each coefficient costs
# p(nonzero) * (2 bits for its Huffman run/size symbol + log2(1 + |q|) magnitude bits), p a sigmoid
# around the rounding threshold |q| = 0.5. DC is coded as a difference to the previous block, as JPEG.
# The proxy and its constants are our choice; tests/test_rewards.py checks its rank correlation with
# real PIL sizes (docs/rewards.md).
Q_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
          14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
          49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]   # ITU T.81 Annex K
Q_CHROMA = [17, 18, 24, 47] + [99] * 4 + [18, 21, 26, 66] + [99] * 4 + [24, 26, 56] + [99] * 5 + [47, 66] + [99] * 38
RATE_SCALE = 1.8  # proxy bits -> real coded bits: median ratio on the Spearman test images (docs/rewards.md)

def jpeg_bytes_per_pixel(images, quality=95):
    x = images.float() * 255                                                   # (B, 3, H, W)
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128                                # JFIF YCbCr, level-shifted
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    sub = lambda c: F.avg_pool2d(F.pad(c[:, None], (0, c.shape[-1] % 2, 0, c.shape[-2] % 2), mode="replicate"), 2)[:, 0]
    n = torch.arange(8.0, device=x.device)
    dct = torch.cos((2 * n[None] + 1) * n[:, None] * math.pi / 16) * torch.where(n[:, None] == 0, 8 ** -0.5, 0.5)
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality              # libjpeg's quality scaling
    bits = 0
    for c, table in ((y, Q_LUMA), (sub(cb), Q_CHROMA), (sub(cr), Q_CHROMA)):
        q = ((torch.tensor(table, device=x.device, dtype=torch.float) * scale + 50) // 100).clamp(1, 255).view(8, 8)
        c = F.pad(c[:, None], (0, -c.shape[-1] % 8, 0, -c.shape[-2] % 8), mode="replicate")[:, 0]  # edge-replicate
        blocks = c.unfold(1, 8, 8).unfold(2, 8, 8).flatten(1, 2)               # (B, nblocks, 8, 8)
        coef = (dct @ blocks @ dct.T / q).flatten(2)                           # quantised DCT, (B, nblocks, 64)
        dc = coef[..., 0]
        coef = torch.cat([torch.diff(dc, dim=1, prepend=torch.zeros_like(dc[:, :1]))[..., None], coef[..., 1:]], -1)
        a = (coef ** 2 + 1e-4).sqrt()                                          # smooth |q|
        p_nonzero = torch.sigmoid(4 * (a - 0.5)) - 1 / (1 + math.exp(2))      # shifted: 0 for a zero coefficient
        bits = bits + (p_nonzero * (2 + torch.log2(1 + a))).sum((1, 2))
    return RATE_SCALE * bits / 8 / (images.shape[-2] * images.shape[-1])      # (B,) coded bytes/pixel, no header

# -----------------------------------------------------------------------------
# Weight-free image rewards for the toy world (32x32 coloured shapes on coloured backgrounds), all in
# [0, 1] except warmth in [-1, 1] and (in)compressibility (JPEG bytes/pixel: 0 flat, ~1.3 uniform noise).
luma = lambda x: 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]          # Rec. 601, (B, H, W)
TOY = {
    # mean luma. Hacked by washing everything out to white.
    "brightness": lambda x: luma(x).mean((1, 2)),
    # mean HSV chroma max(R,G,B) - min(R,G,B). Hacked by painting every pixel a pure primary/secondary.
    "saturation": lambda x: (x.amax(1) - x.amin(1)).mean((1, 2)),
    # 2 * std of luma over the image (1 = half black, half white). Hacked by hard black/white patterns.
    "contrast": lambda x: 2 * luma(x).flatten(1).std(1, correction=0),
    # mean(R - B): oranges and reds high, blues low. Hacked by a flat orange wash.
    "warmth": lambda x: (x[:, 0] - x[:, 2]).mean((1, 2)),
    # minus estimated JPEG bytes/pixel. Hacked by flat images (no shapes at all).
    "compressibility": lambda x: -jpeg_bytes_per_pixel(x),
    # plus estimated JPEG bytes/pixel. Hacked by high-frequency noise.
    "incompressibility": lambda x: jpeg_bytes_per_pixel(x),
}
# Toy-world sequences: contrast -> saturation -> brightness is the default (toy_world.TOY_REWARDS); docs/experiments.md
# measures it and brightness -> warmth -> contrast. The greedy path for brightness is white, which erases saturation
# and contrast (forgetting shows), yet brightness and saturation can be high at once (pure yellow: luma 0.89,
# chroma 1). compressibility and incompressibility are exact opposites: not jointly satisfiable, avoid the pair.

class ImageReward(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, images, prompts=None):   # prompts are ignored; fp32 whatever the compute dtype (cheap)
        return self.fn(images.float())

def load_toy(name):
    return lambda path, device, dtype: ImageReward(TOY[name])

# -----------------------------------------------------------------------------
# The toy world's learned rewards, trained by toy.py and shipped in toy_model/ (docs/toy_world.md): toyclip, a tiny
# CLIP whose cosine of image and prompt stands for "the image shows its caption"; toypref, a tiny CLIP image tower
# with the aesthetic predictor's head, trained on pairs ranked by a hidden rule (toy_world.preference_truth). Each has
# a ground truth computed from the pixels by rule, so that hacking them shows (eval.hacking).
TOY_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_model")
LEARNED_TOY = ("toyclip", "toypref")

# -----------------------------------------------------------------------------
# Registry: name -> loader(path, device, dtype). Looking a name up costs nothing; loading happens on call.
REWARDS = {
    "aesthetic": load_aesthetic,
    "hps": load_hps,
    "pickscore": load_clip_like("pickscore", "yuvalkirstain/PickScore_v1", LAION_H14, scaled=True),
    "clip": load_clip_like("clip", CLIP_L14, CLIP_L14, scaled=False),
    "imagereward": load_imagereward,
    "toyclip": load_clip_like("toyclip", os.path.join(TOY_MODEL_DIR, "toyclip"), os.path.join(TOY_MODEL_DIR, "toyclip"),
                              scaled=False),
    "toypref": lambda path, device, dtype: load_aesthetic(path or os.path.join(TOY_MODEL_DIR, "toypref"), device,
                                                          dtype, "toypref"),
    **{name: load_toy(name) for name in TOY},
}

def check_reward_name(name):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")

def load_reward(name, path=None, device="cpu", dtype=torch.float32):
    check_reward_name(name)
    if path and name in TOY:
        raise ValueError(f"reward {name!r} has no weights; drop --reward_path {name}={path}")
    reward = REWARDS[name](path, device, dtype)
    return reward.eval().requires_grad_(False)
