"""
parity_references.py: rewards.py and eval.py's SSIM against the reference packages themselves, which cannot be
project dependencies (they pull torchvision, timm, fairscale, scipy and old transformers). Two steps, in two
environments:

  1. in a separate virtual environment that holds the references (docs/rewards.md has the install lines):
         python parity_references.py reference --out /tmp/parity
     - ImageReward (PyPI `image-reward`): its own ImageReward class, shrunk (a 2-block ViT of width 64 and a
       2-layer BERT: the reference code, small random weights), saved in the published layout (ImageReward.pt,
       med_config.json, a BERT vocab.txt), with its scores of 8 PNG images of several sizes (ImageReward.score);
     - HPS's text side (PyPI `open_clip_torch`): open_clip's tokenizer on prompts with "!", HTML entities, curly
       quotes, ligatures and full-width letters, and its BPE vocabulary written as vocab.json + merges.txt in the
       layout of the laion tokenizer files (pad token "!");
     - SSIM (PyPI `scikit-image`): structural_similarity of image pairs (an image and a noisy copy), with
       use_sample_covariance False (eval.ssim's definition) and True (skimage's default).
     --only NAME (repeatable: imagereward, hps, ssim) runs a part, in an environment that holds only its package.
  2. in the project's environment:
         python parity_references.py check --out /tmp/parity
     loads the same files through load_reward("imagereward", folder) and through hps's tokenisation, prints the
     largest differences, and checks that a deliberately wrong preprocessing (squash instead of resize and crop)
     fails the same tolerance, and eval.ssim on the same pairs. Exit code 0 when everything agrees.
"""
import argparse
import json
import math
import os
import sys

PROMPTS = ["a red circle on a blue background", "a photo of a cat", "a green square", "an orange sunset over hills",
           "two dogs playing in the snow", "a bowl of soup", "a castle on a hill", "a robot reading a book"]
TRICKY = ["NOISE!!! static", "Tom &amp; Jerry", "“quoted” words", "a ﬁne ﬂower", "ＦＵＬＬ width", "wow!",
          "Hello!!!   World", "café crème brûlée", "&lt;b&gt;bold&lt;/b&gt;", "it’s a dog’s life"]
SIZES = [(224, 224), (256, 256), (300, 200), (200, 360), (512, 384), (97, 150), (33, 77), (640, 481)]
TOLERANCE = 0.01  # on ImageReward scores (standardised, about unit scale): |ours - reference| <= 0.01


def images():
    """Smooth random fields with a gradient and some texture, uint8 (H, W, 3), one per size: fixed by a seed."""
    import numpy as np
    rng = np.random.default_rng(0)
    out = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.random((3, 1, 1)) + 0.4 * np.sin(6 * xx[None] * rng.random((3, 1, 1)) + 4 * yy[None])
        noise = 0.08 * rng.standard_normal((3, h, w))
        out.append((np.clip(0.5 * base + 0.25 + noise, 0, 1).transpose(1, 2, 0) * 255).round().astype("uint8"))
    return out


def reference(out, parts):
    """Runs in the references' environment: writes the files of the checks in `parts` and reference.json."""
    os.makedirs(out, exist_ok=True)
    ref = {"prompts": PROMPTS, "tricky": TRICKY}
    if "imagereward" in parts:
        ref["imagereward"] = imagereward_reference(out)
    if "hps" in parts:
        ref["openclip_ids"] = openclip_reference(out)
    if "ssim" in parts:
        ref["ssim"] = ssim_reference(out)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(f"wrote the reference files and scores to {out}")


def ssim_pairs():
    """(image, noisy copy) uint8 pairs of three sizes, fixed by a seed."""
    import numpy as np
    rng = np.random.default_rng(1)
    pairs = []
    for array in images()[:3] + [images()[6]]:
        noisy = np.clip(array.astype(float) + rng.normal(0, 25, array.shape), 0, 255).round().astype("uint8")
        pairs.append((array, noisy))
    return pairs


def ssim_reference(out):
    """skimage's SSIM of each pair, Gaussian window sigma 1.5, data range 1, per channel. -> {"false": [...],
    "true": [...]} for use_sample_covariance False and True (skimage's default)."""
    from PIL import Image
    from skimage.metrics import structural_similarity
    scores = {"false": [], "true": []}
    for k, (a, b) in enumerate(ssim_pairs()):
        Image.fromarray(b).save(os.path.join(out, f"noisy{k}.png"))
        for cov in (False, True):
            scores[str(cov).lower()].append(float(structural_similarity(
                a / 255, b / 255, gaussian_weights=True, sigma=1.5, data_range=1.0, channel_axis=2,
                use_sample_covariance=cov)))
    return scores


def imagereward_reference(out):
    """A shrunk ImageReward (its own class, small random weights) saved in the published layout, and its scores of
    the PNG images. -> [score of image k under PROMPTS[k]]"""
    import types, importlib.util
    import torch
    from PIL import Image
    # Import ImageReward's model files without its package __init__ (which imports openai-clip, accelerate, ...).
    root = os.path.dirname(importlib.util.find_spec("ImageReward").origin)
    for name, sub in (("ImageReward", ""), ("ImageReward.models", "models")):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = module
    import ImageReward.ImageReward as IR
    import ImageReward.models.BLIP.blip_pretrain as bp
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer
    # A small BERT vocabulary (the hub's bert-base-uncased is not reachable), then BLIP's own additions.
    words = sorted({w for p in PROMPTS for w in p.split()})
    with open(os.path.join(out, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]) + "\n")

    def init_tokenizer():  # blip.init_tokenizer, with the local vocabulary
        tok = BertTokenizer(os.path.join(out, "vocab.txt"))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok
    bp.init_tokenizer = init_tokenizer
    bp.create_vit = lambda *a, **k: (VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2,
                                                       num_heads=1, drop_path_rate=0.0), 64)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(init_tokenizer()),
           "encoder_width": 64, "add_cross_attention": True}  # ImageReward's MLP(768) fixes the text width
    with open(os.path.join(out, "med_config.json"), "w") as f:
        json.dump(med, f, indent=2)
    torch.manual_seed(0)
    model = IR.ImageReward(med_config=os.path.join(out, "med_config.json")).eval()
    with torch.no_grad():  # unit-gain weights, so that scores depend on the image and a 0.01 tolerance means something
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif "bias" in name:
                p.normal_(0, 0.1)
    torch.save(model.state_dict(), os.path.join(out, "ImageReward.pt"))
    scores = []
    for k, (array, prompt) in enumerate(zip(images(), PROMPTS)):
        Image.fromarray(array).save(os.path.join(out, f"image{k}.png"))
        scores.append(model.score(prompt, Image.open(os.path.join(out, f"image{k}.png"))))
    return scores


def openclip_reference(out):
    """HPS's text side: open_clip's BPE vocabulary written in the transformers (laion) file layout, and open_clip's
    own token ids of the TRICKY prompts. -> [ids of each prompt, padded to 77]"""
    from open_clip.tokenizer import SimpleTokenizer
    oc = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # the laion files' names
    vocab = {names.get(token, token): i for token, i in oc.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(oc.bpe_ranks.items(), key=lambda kv: kv[1])]
    os.makedirs(os.path.join(out, "laion_tokenizer"), exist_ok=True)
    with open(os.path.join(out, "laion_tokenizer", "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out, "laion_tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return [oc(p, context_length=77)[0].tolist() for p in TRICKY]  # open_clip's tokenize: cleaning, BPE, pad 0


def check(out):
    """Runs in the project's environment: every part that reference.json holds."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import rewards
    with open(os.path.join(out, "reference.json")) as f:
        ref = json.load(f)
    ok = True
    if "imagereward" in ref:
        ok &= check_imagereward(out, ref, rewards)
    if "openclip_ids" in ref:
        ok &= check_hps(out, ref, rewards)
    if "ssim" in ref:
        ok &= check_ssim(out, ref)
    print("parity: OK" if ok else "parity: FAILED")
    sys.exit(0 if ok else 1)


def check_imagereward(out, ref, rewards):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    reward = rewards.load_reward("imagereward", out)
    worst, wrong_best = 0.0, math.inf
    for k, (prompt, target) in enumerate(zip(ref["prompts"], ref["imagereward"])):
        x = torch.from_numpy(np.array(Image.open(os.path.join(out, f"image{k}.png")))).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            ours = reward(x, [prompt]).item()
            squashed = reward(F.interpolate(x, (224, 224), mode="bicubic", antialias=True), [prompt]).item()
        worst = max(worst, abs(ours - target))
        if x.shape[-1] != x.shape[-2]:  # a square image is squashed by the resize alone: the same pixels
            wrong_best = min(wrong_best, abs(squashed - target))
        print(f"image {k} {tuple(x.shape[-2:])}: reference {target:+.5f}  ours {ours:+.5f}  squashed {squashed:+.5f}")
    print(f"imagereward: largest |ours - reference| = {worst:.2e} (tolerance {TOLERANCE}); a squash instead of "
          f"resize + crop misses by at least {wrong_best:.2e}")
    return worst <= TOLERANCE < wrong_best


def check_hps(out, ref, rewards):
    """HPS's tokenisation with the laion tokenizer layout (pad token "!") against open_clip's ids."""
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(os.path.join(out, "laion_tokenizer"), pad_token="!", model_max_length=77)
    bad = 0
    for prompt, want in zip(ref["tricky"], ref["openclip_ids"]):
        got = tok([rewards.openclip_clean(prompt)], padding="max_length", max_length=77, truncation=True,
                  split_special_tokens=True).input_ids[0]
        plain = tok([prompt], padding="max_length", max_length=77, truncation=True).input_ids[0]
        n = want.index(max(want)) + 1  # up to open_clip's end-of-text (the highest id); padding never reaches EOT
        bad += got[:n] != want[:n]
        print(f"{prompt!r}: open_clip {want[:n]}, ours {'same' if got[:n] == want[:n] else got[:n]}, "
              f"plain transformers {'same' if plain[:n] == want[:n] else 'differs'}")
    print(f"hps tokenisation: {len(ref['tricky']) - bad} of {len(ref['tricky'])} prompts equal open_clip's ids")
    return bad == 0


def check_ssim(out, ref):
    """eval.ssim on the same pairs (8-bit images, as the structure measures see them) against skimage's."""
    import numpy as np
    import torch
    from PIL import Image
    from eval import ssim
    worst, default = 0.0, 0.0
    for k, (a, _) in enumerate(ssim_pairs()):
        b = np.array(Image.open(os.path.join(out, f"noisy{k}.png")))
        x, y = (torch.from_numpy(v).permute(2, 0, 1).float()[None] / 255 for v in (a, b))
        ours = ssim(x, y).item()
        worst = max(worst, abs(ours - ref["ssim"]["false"][k]))
        default = max(default, abs(ours - ref["ssim"]["true"][k]))
        print(f"pair {k} {a.shape[:2]}: skimage {ref['ssim']['false'][k]:.7f} (default: {ref['ssim']['true'][k]:.7f}), "
              f"ours {ours:.7f}")
    print(f"ssim: largest |ours - skimage(use_sample_covariance=False)| = {worst:.1e}; against skimage's default "
          f"(use_sample_covariance=True) {default:.1e}")
    return worst <= 1e-6


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rewards.py against the reference packages (two environments)")
    parser.add_argument("step", choices=["reference", "check"], help="reference: in the side venv; check: in ours")
    parser.add_argument("--out", required=True, help="folder the reference step writes and the check step reads")
    parser.add_argument("--only", action="append", choices=["imagereward", "hps", "ssim"], default=[],
                        help="reference step: only this part (repeat for more); none = all three")
    args = parser.parse_args()
    if args.step == "reference":
        reference(args.out, args.only or ["imagereward", "hps", "ssim"])
    else:
        check(args.out)
