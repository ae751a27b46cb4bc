import pytest
import torch

from kneeoa.explain.cam import gradcam
from kneeoa.models.cnn.backbones import BACKBONES, MultiTaskNet, TaskView
from kneeoa.models.cnn.twobranch import GeMPool, MeanPool, TwoBranchNet


def test_shapes_and_shared_weights():
    net = TwoBranchNet().eval()
    x = torch.rand(3, 1, 224, 224)
    assert net(x).shape == (3, net.num_features) == (3, 256)
    assert sum(p.numel() for p in net.parameters()) < 400_000
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 256)  # tiny test images still work


def test_branches_see_the_two_halves_and_the_medial_patch_mirrored():
    """A picture mirrored about the vertical centre line swaps the two feature halves (shared, mirrored branch)."""
    torch.manual_seed(0)
    net = TwoBranchNet(drop=0.0).eval()
    x = torch.rand(1, 1, 64, 64)
    f, g = net(x), net(x.flip(-1))
    c = net.num_features // 2
    assert torch.allclose(f[:, :c], g[:, c:], atol=1e-5) and torch.allclose(f[:, c:], g[:, :c], atol=1e-5)


def test_gradcam_on_the_fold_is_aligned_with_the_input():
    """Only the image-right patch carries a signal the head uses: the map must peak in the image-right half."""
    torch.manual_seed(0)
    net = MultiTaskNet(TwoBranchNet(drop=0.0), {"klg": 5}).eval()
    x = torch.zeros(2, 1, 224, 224)
    x[:, :, 100:130, 160:200] = 1.0
    layer = BACKBONES.get("twobranch").cam_layers["last"](net.backbone)
    with torch.no_grad():
        net.heads["klg"].weight.zero_()
        net.heads["klg"].weight[1, 128:] = 1.0  # class 1 reads only the medial (image-right) branch
    maps = gradcam(TaskView(net, "klg"), layer, x, [1, 1])
    for m in maps:
        assert m.shape == (224, 224)
        assert m[:, 112:].sum() > 5 * m[:, :112].sum()
        assert m[:40].sum() + m[-40:].sum() < 0.05 * m.sum()  # nothing outside the patch band (rows 56-168)


def test_patch_height_sets_the_band_the_net_reads():
    """patch_height 0.4 at 224 px reads rows 67-157: a change outside them leaves the features as they were."""
    torch.manual_seed(0)
    net = TwoBranchNet(patch_height=0.4, drop=0.0).eval()
    assert net.input_rows(224) == (67, 157) and TwoBranchNet().input_rows(224) == (56, 168)
    x = torch.rand(1, 1, 224, 224)
    outside, inside = x.clone(), x.clone()
    outside[:, :, 160:] = 0.0
    inside[:, :, 150:157] = 0.0
    with torch.no_grad():
        assert torch.equal(net(x), net(outside))
        assert not torch.allclose(net(x), net(inside))


@pytest.mark.parametrize("height", [0.0, -0.2, 1.5])
def test_a_patch_height_outside_0_1_is_refused(height):
    with pytest.raises(ValueError, match=r"patch_height .* in \(0, 1\]; got"):
        TwoBranchNet(patch_height=height)


def test_gem_pooling_lies_between_the_mean_and_the_maximum_and_weighs_a_small_bright_spot_more():
    """On one branch map a lone bright cell lifts the GeM feature far more than the mean; p = 1 is the mean."""
    x = torch.full((1, 2, 3, 3), 0.1)
    x[0, 0, 1, 2] = 2.0
    gem, mean = GeMPool()(x), MeanPool()(x)
    assert torch.all(mean <= gem + 1e-6) and torch.all(gem <= x.amax(dim=(2, 3)) + 1e-6)
    assert gem[0, 0] - gem[0, 1] > 2 * (mean[0, 0] - mean[0, 1])
    assert torch.allclose(GeMPool(p=1.0)(x), mean, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert GeMPool()(x.bfloat16()).dtype == torch.bfloat16


def test_the_pool_option_changes_the_features_not_their_shape():
    torch.manual_seed(0)
    mean_net = TwoBranchNet(drop=0.0).eval()
    gem_net = TwoBranchNet(drop=0.0, pool="gem").eval()
    gem_net.load_state_dict(mean_net.state_dict())  # no weights of its own: mean checkpoints load into a GeM net
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        f, g = mean_net(x), gem_net(x)
    assert f.shape == g.shape == (2, 256)
    assert torch.all(g >= f - 1e-5) and not torch.allclose(f, g)


def test_an_unknown_pool_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"pool must be one of \['gem', 'mean'\]; got 'max'"):
        TwoBranchNet(pool="max")
