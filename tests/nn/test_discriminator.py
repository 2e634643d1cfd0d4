"""The context discriminator that training uses (glcic_fast.nn.discriminator): the paper's
and GLCIC-PyTorch's layouts, logits, GLCIC-PyTorch checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glcic_fast.nn.discriminator import ContextDiscriminator, default_conv_count, load_discriminator


def test_discriminator_conv_counts_follow_paper_and_glcic_pytorch():
    assert [default_conv_count(s, 6) for s in (256, 160, 32)] == [6, 5, 5]
    assert [default_conv_count(s, 5) for s in (128, 96, 16)] == [5, 5, 4]
    d = ContextDiscriminator()
    assert d.model_ld.n_convs == 5 and d.model_gd.n_convs == 6
    assert hasattr(d.model_ld, "linear6") and hasattr(d.model_gd, "linear7")
    celeba = ContextDiscriminator(96, 160, True)
    assert celeba.model_gd.n_convs == 5 and hasattr(celeba.model_gd, "linear6")


def test_discriminator_returns_logits():
    torch.manual_seed(0)
    d = ContextDiscriminator(16, 32, channels=(8, 16, 16, 16, 16)).eval()
    local, whole = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        d.linear1.bias.fill_(50.0)  # a confident D: sigmoid rounds to 1, the logit does not
        logit = d(local, whole)
        assert logit.shape == (3, 1)
        assert torch.equal(d.probability(local, whole), torch.sigmoid(logit))
    loss = F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit))
    assert torch.isfinite(loss) and loss > 40
    with pytest.raises(ValueError, match="N x 3 x 16 x 16"):
        d(torch.rand(1, 3, 17, 16), whole[:1])


class _GlcicPytorchTrunk(nn.Module):
    """GLCIC-PyTorch's Local/GlobalDiscriminator as its models.py lays it out (written here
    from the key names and block order in SPEC.md 6b): conv{i} -> act{i} -> bn{i}, then
    flatten, linear{n+1}, ReLU."""

    def __init__(self, size, n):
        super().__init__()
        channels = (64, 128, 256, 512, 512, 512)[:n]
        cin = 3
        for i, c in enumerate(channels, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, c, 5, 2, 2))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
            setattr(self, f"act{i}", nn.ReLU())
            cin = c
        self.n = n
        setattr(self, f"linear{n + 1}", nn.Linear(512 * (size // 2 ** n) ** 2, 1024))

    def forward(self, x):
        for i in range(1, self.n + 1):
            x = getattr(self, f"bn{i}")(getattr(self, f"act{i}")(getattr(self, f"conv{i}")(x)))
        return F.relu(getattr(self, f"linear{self.n + 1}")(x.flatten(1)))


class _GlcicPytorchContext(nn.Module):
    def __init__(self, local_size, global_size, global_convs):
        super().__init__()
        self.model_ld = _GlcicPytorchTrunk(local_size, 5)
        self.model_gd = _GlcicPytorchTrunk(global_size, global_convs)
        self.linear1 = nn.Linear(2048, 1)

    def forward(self, local, whole):
        return torch.sigmoid(self.linear1(torch.cat([self.model_ld(local), self.model_gd(whole)], 1)))


@pytest.mark.parametrize("arch", [("places2", 128, 256, 6), ("celeba", 96, 160, 5)], ids=lambda a: a[0])
def test_discriminator_loads_glcic_pytorch_checkpoint(arch, tmp_path):
    _, local_size, global_size, global_convs = arch
    torch.manual_seed(1)
    theirs = _GlcicPytorchContext(local_size, global_size, global_convs)
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong block order shows
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    theirs.eval()
    path = tmp_path / "model_cd_step1000"
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, path)  # nn.DataParallel save
    ours = load_discriminator(path).eval()
    assert (ours.local_size, ours.global_size, ours.model_gd.n_convs) == (local_size, global_size, global_convs)
    local, whole = torch.rand(2, 3, local_size, local_size), torch.rand(2, 3, global_size, global_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.probability(local, whole), theirs(local, whole), rtol=1e-5, atol=1e-6)
    # The same state dict also loads straight into a ContextDiscriminator of that shape.
    again = ContextDiscriminator(local_size, global_size, True)
    again.load_state_dict(torch.load(path, weights_only=True))
