"""Feature spaces for evaluation: the FID Inception-v3 network, and a small classifier trained on the data
set itself (Inception features, made for 299x299 photos, say little about 8x8 or 28x28 digits)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.errors import FeatureError
from ddpm.files import write_atomically

Extractor = Callable[[torch.Tensor], torch.Tensor]  # images in [-1, 1] -> (N, D) features
FEATURES = ("classifier", "inception", "pixels")  # the feature spaces ddpm-eval scores in

# pytorch-fid's port of the TensorFlow FID Inception weights
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------------------------- classifier
class Classifier(nn.Module):
    """Three conv layers and global pooling; ``features`` is the pooled 4*width vector before the head."""

    def __init__(self, channels: int, classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, held_out: float = 0.15
) -> tuple[Classifier, float]:
    """Train on (1 - held_out) of the images with Adam; return the network and its held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=g)
    n_test = max(1, int(held_out * images.shape[0]))
    test, train = order[:n_test], order[n_test:]
    with torch.random.fork_rng(devices=[]):  # a training run that scores itself keeps its own RNG stream
        torch.manual_seed(seed)
        net = Classifier(images.shape[1], int(labels.max()) + 1)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            batch = train[torch.randint(0, train.shape[0], (128,), generator=g)]
            loss = F.cross_entropy(net(images[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(images[test]).argmax(1) == labels[test]).double().mean())
    return net, accuracy


def load_classifier(
    images: torch.Tensor | None, labels: torch.Tensor | None, cache: Path, steps: int, seed: int
) -> tuple[Classifier, float]:
    """The classifier of this data set and image shape, in eval mode: read from ``cache``, or trained once
    on ``images`` and saved there; and its held-out accuracy."""
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        net = Classifier(saved["channels"], saved["classes"])
        net.load_state_dict(saved["state"])
        accuracy = saved["accuracy"]
    else:
        if images is None or labels is None:
            raise FeatureError(
                "features=classifier needs a labelled data set (digits, mnist, fashion_mnist, "
                "cifar10); for a folder of images use features=[inception]"
            )
        net, accuracy = train_classifier(images, labels, steps, seed)
        state = {
            "state": net.state_dict(),
            "accuracy": accuracy,
            "channels": images.shape[1],
            "classes": int(labels.max()) + 1,
        }
        write_atomically(cache, lambda f: torch.save(state, f))
    return net.eval(), accuracy


def classifier_features(net: Classifier) -> Extractor:
    """The classifier's pooled features (the vector before its head) as a feature space."""

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net.features(chunk) for chunk in x.split(512)])

    return extract


@torch.no_grad()
def predict_classes(net: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The class the classifier finds most likely for each image."""
    return torch.cat([net(chunk).argmax(1) for chunk in x.split(512)])


def classifier_extractor(
    images: torch.Tensor | None, labels: torch.Tensor | None, cache: Path, steps: int, seed: int
) -> tuple[Extractor, float]:
    """The feature function of the data set's classifier (load_classifier) and its held-out accuracy."""
    net, accuracy = load_classifier(images, labels, cache, steps, seed)
    return classifier_features(net), accuracy


# ----------------------------------------------------------------------------------------------- pixels
def pixel_extractor() -> Extractor:
    """The images' own pixels as features: nothing learned, so nothing to flatter; a second opinion beside
    a network's features (C x H x W features: FID needs more images than that)."""

    def extract(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float()

    return extract


# -------------------------------------------------------------------------------------------- inception
def fid_inception_structure() -> nn.Module:
    """Inception-v3 with the FID blocks of the TensorFlow graph, as ported by pytorch-fid; no weights."""
    from pytorch_fid import inception as pfi

    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


def fid_inception(weights: str | None) -> nn.Module:
    """The FID Inception-v3 with its weights read from the local file ``weights`` (or downloaded by
    torch.hub when ``weights`` is None)."""
    net = fid_inception_structure()
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FeatureError(
                f"inception_weights={weights} does not exist; it is pytorch-fid's "
                f"pt_inception-2015-12-05-6726825d.pth ({FID_WEIGHTS_URL})"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as e:
            raise FeatureError(
                f"inception_weights={weights} is not the FID Inception state dict: "
                f"{str(e).strip().splitlines()[0]}"
            ) from e
    else:
        try:
            net.load_state_dict(torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=False))
        except OSError as e:  # URLError and socket errors: no network
            raise FeatureError(
                "features=inception could not download the FID Inception weights (no network?); download "
                f"{FID_WEIGHTS_URL} elsewhere and pass inception_weights=PATH, or use features=[classifier]"
            ) from e
    return net.eval()


def inception_extractor(weights: str | None, device: torch.device) -> Extractor:
    net = fid_inception(weights).to(device)
    stem = [
        net.Conv2d_1a_3x3,
        net.Conv2d_2a_3x3,
        net.Conv2d_2b_3x3,
        nn.MaxPool2d(3, 2),
        net.Conv2d_3b_1x1,
        net.Conv2d_4a_3x3,
        nn.MaxPool2d(3, 2),
    ]
    mixed = [
        net.Mixed_5b,
        net.Mixed_5c,
        net.Mixed_5d,
        net.Mixed_6a,
        net.Mixed_6b,
        net.Mixed_6c,
        net.Mixed_6d,
        net.Mixed_6e,
        net.Mixed_7a,
        net.Mixed_7b,
        net.Mixed_7c,
    ]
    body = nn.Sequential(*stem, *mixed, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in x.split(64):
            chunk = chunk.to(device)
            if chunk.shape[1] == 1:
                chunk = chunk.repeat(1, 3, 1, 1)
            # the network takes 299x299 inputs in [-1, 1]; bilinear resize as pytorch-fid does
            chunk = F.interpolate(chunk, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(body(chunk).cpu())
        return torch.cat(out)

    return extract
