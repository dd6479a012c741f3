"""The few-row CPU linear path: same product as ``F.linear`` (fp32, another summation order),
scoped to ``with``, and only for plain fp32 ``nn.Linear`` on CPU."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aad_fast.cpu_linear import MAX_ROWS, FewRowLinears


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(192, 320, bias=True, dtype=dtype)
        self.b = nn.Linear(320, 96, bias=False, dtype=dtype)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _plain(net, x):
    return F.linear(torch.relu(F.linear(x, net.a.weight, net.a.bias)), net.b.weight)


@pytest.mark.parametrize("shape", [(1, 192), (1, 1, 192), (2, 1, 192), (3, 192), (4, 4, 192),
                                   (MAX_ROWS, 192), (MAX_ROWS + 1, 192), (5, 40, 192)])
def test_same_product_as_f_linear(shape):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(shape)
    want = _plain(net, x)
    with FewRowLinears(net) as ctx:
        assert len(ctx.linears) == 2
        got = net(x)
    assert got.shape == want.shape and got.is_contiguous()
    # fp32 with another summation order: a few ulps of the sums (|sum| ~ 1-10 here)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    torch.manual_seed(1)
    net = Net()
    x = torch.randn(3, 384)[:, ::2]
    with FewRowLinears(net):
        got = net(x)
    torch.testing.assert_close(got, _plain(net, x), rtol=1e-5, atol=1e-5)


def test_scoped_to_with_and_restored_after_an_error():
    net = Net()
    ctx = FewRowLinears(net)
    with pytest.raises(RuntimeError, match="boom"):
        with ctx:
            assert "forward" in net.a.__dict__
            raise RuntimeError("boom")
    assert "forward" not in net.a.__dict__ and "forward" not in net.b.__dict__
    assert net.a.forward.__func__ is nn.Linear.forward


def test_only_fp32_cpu_and_plain_linear(monkeypatch):
    assert FewRowLinears(Net(torch.bfloat16)).linears == []
    monkeypatch.setenv("AAD_FAST_CPU_FEW_ROW_LINEAR", "0")
    assert FewRowLinears(Net()).linears == []
    monkeypatch.delenv("AAD_FAST_CPU_FEW_ROW_LINEAR")

    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(8, 8), nn.Linear(8, 8))
    assert FewRowLinears(net).linears == [net[1]]



def test_a_layer_with_its_own_forward_is_left_alone():
    net = Net()
    calls = []

    def patched(x):
        calls.append(1)
        return F.linear(x, net.a.weight, net.a.bias)

    net.a.forward = patched
    with FewRowLinears(net):
        assert net.a.__dict__["forward"] is patched and "forward" in net.b.__dict__
        net(torch.randn(2, 192))
    assert calls == [1] and net.a.__dict__["forward"] is patched
    assert "forward" not in net.b.__dict__
