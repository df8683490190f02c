"""The party loads its private model from TorchScript or from an architecture plus weights."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from amalgam.fusion.models import create_model
from amalgam.party.config import load_party_config
from amalgam.party.handler import PartyHandler

KWARGS = {"in_shape": [1, 8, 8], "num_classes": 3, "hidden": 8}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mlp", **KWARGS).eval()


def _config(tmp_path, model_section):
    config = {
        "name": "p",
        "model": model_section,
        "class_names": ["a", "b", "c"],
        "input_shape": [1, 8, 8],
        "policy": {"predict": {"output": "logits"}},
    }
    path = tmp_path / "sub" / "party.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("save", ["torchscript", "safetensors", "torch.save"])
def test_every_model_source_gives_the_owners_outputs(tmp_path, model, save):
    folder = tmp_path / "sub"
    folder.mkdir()
    if save == "torchscript":
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 8, 8)), str(folder / "m.pt"))
        section = {"torchscript": "m.pt"}  # relative to the config's folder
    elif save == "safetensors":
        save_file(model.state_dict(), str(folder / "m.safetensors"))
        section = {"arch": "mlp", "kwargs": KWARGS, "weights": "m.safetensors"}
    else:
        torch.save(model.state_dict(), folder / "m.pt")
        section = {"arch": "mlp", "kwargs": KWARGS, "weights": "m.pt"}
    config = load_party_config(_config(tmp_path, section))
    handler = PartyHandler.from_config(config)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(handler.predict(x, caller="owner"), expected)
    assert config.audit_log == str(folder / "audit.jsonl")
    assert all(not p.requires_grad for p in handler.model.parameters())


def test_a_pickled_object_is_refused(tmp_path, model):
    folder = tmp_path / "sub"
    folder.mkdir()
    torch.save({"weights": model.state_dict(), "hook": print}, folder / "m.pt")
    section = {"arch": "mlp", "kwargs": KWARGS, "weights": "m.pt"}
    with pytest.raises(Exception, match="[Ww]eights only"):
        PartyHandler.from_config(load_party_config(_config(tmp_path, section)))
