import torch

from model.driven_encoder import DrivenEncoder


def test_output_is_eight_times_smaller_with_four_channels():
    encoder = DrivenEncoder()
    frames = torch.rand(1, 1, 3, 512, 512) * 2 - 1
    assert encoder(frames).shape == (1, 1, 4, 64, 64)
    assert encoder(torch.rand(2, 3, 3, 64, 64)).shape == (2, 3, 4, 8, 8)


def test_init_is_he_normal_with_zero_bias():
    encoder = DrivenEncoder()
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    wide = convs[-2]  # 64 -> 128, k3: fan_in 576, He std sqrt(2 / 576)
    assert abs(wide.weight.std().item() - (2 / 576) ** 0.5) < 0.01


def test_ada_branch_starts_as_identity_and_then_depends_on_the_reference():
    torch.manual_seed(0)
    plain = DrivenEncoder()
    ada = DrivenEncoder(ada=True)
    ada.load_state_dict(plain.state_dict(), strict=False)
    frames, reference = torch.rand(2, 2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ada(frames, reference), plain(frames), rtol=0, atol=0)
    with torch.no_grad():
        ada.ada.mlp[-1].weight.normal_()
    assert not torch.allclose(ada(frames, reference), ada(frames, reference.flip(0)))
