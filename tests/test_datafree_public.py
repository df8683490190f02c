"""benchmarks/datafree_public.py: the public DataFree code is imported from a checkout without
its package __init__ files, and its DFQ loop trains a student on the benchmark's teachers."""

from __future__ import annotations

import sys

import pytest
import torch

from amalgam.fusion.models import MLP, create_model
from amalgam.fusion.train import StudentConfig
from benchmarks.datafree_public import MeanTeacher, load_public_code, run_public_dfq

# a stand-in checkout with the layout and the signatures the loop uses; its package __init__
# files fail, as the real ones do without their data set and plotting libraries
FILES = {
    "datafree/__init__.py": "raise ImportError('kornia')",
    "datafree/utils/__init__.py": "raise ImportError('termcolor')",
    "datafree/synthesis/__init__.py": "raise ImportError('kornia')",
    "datafree/models/__init__.py": "raise ImportError('torchvision.models.segmentation')",
    "datafree/utils/_utils.py": "ImagePool = DataIter = clip_images = None",
    "datafree/criterions.py": (
        "import torch.nn.functional as F\n"
        "class KLDiv:\n"
        "    def __call__(self, logits, targets):\n"
        "        return F.kl_div(F.log_softmax(logits, 1), F.softmax(targets, 1),"
        " reduction='batchmean')\n"
    ),
    "datafree/models/generator.py": (
        "import torch\n"
        "class LargeGenerator(torch.nn.Module):\n"
        "    def __init__(self, nz, ngf, img_size, nc):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(nz, nc * img_size * img_size)\n"
        "        self.shape = (nc, img_size, img_size)\n"
        "    def forward(self, z):\n"
        "        return torch.sigmoid(self.fc(z)).view(len(z), *self.shape)\n"
    ),
    "datafree/synthesis/generative.py": (
        "import torch\n"
        "from datafree.utils import ImagePool, DataIter, clip_images\n"
        "class GenerativeSynthesizer:\n"
        "    def __init__(self, teacher, student, generator, nz, sample_batch_size, adv,"
        " **settings):\n"
        "        self.generator, self.nz, self.batch, self.adv = generator, nz,"
        " sample_batch_size, adv\n"
        "        self.steps = 0\n"
        "    def synthesize(self):\n"
        "        self.steps += 1\n"
        "    def sample(self):\n"
        "        return self.generator(torch.randn(self.batch, self.nz)).detach()\n"
    ),
}


@pytest.fixture
def checkout(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    yield tmp_path
    for name in [m for m in sys.modules if m == "datafree" or m.startswith("datafree.")]:
        del sys.modules[name]


def test_the_public_loop_runs_from_a_checkout_without_its_package_init(checkout):
    code = load_public_code(checkout)
    torch.manual_seed(0)
    models = [create_model("small_cnn", in_shape=(1, 8, 8), num_classes=3) for _ in range(2)]
    student_net = StudentConfig(arch="mlp", kwargs={"hidden": 16})  # not the teachers' family
    budget = {"warmup": 2, "iterations": 3, "student_steps": 2, "student": student_net}
    student = run_public_dfq(code, models, (1, 8, 8), 1.0, budget, seed=0)
    assert not student.training
    assert isinstance(student, MLP)
    assert student(torch.rand(4, 1, 8, 8)).shape == (4, 3)


def test_the_teachers_answer_as_one_with_their_mean_logits():
    torch.manual_seed(0)
    models = [create_model("small_cnn", in_shape=(1, 8, 8), num_classes=3).eval() for _ in "ab"]
    x = torch.rand(5, 1, 8, 8)
    logits, _ = MeanTeacher(models)(x, return_features=True)
    assert torch.allclose(logits, (models[0](x) + models[1](x)) / 2)


def test_a_folder_that_is_not_a_checkout_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^--public-code: .* is not a checkout of zju-vipa"):
        load_public_code(tmp_path)
