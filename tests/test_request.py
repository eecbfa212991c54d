import numpy as np
import pytest

from sdserve_protocol.contract import decode_request
from sdserve_protocol.rules import MAX_SEED, Limits, RequestError
from sdserve_protocol.settings import SCHEDULER_NAMES, PipelineSettings

LIMITS = Limits(
    max_pixels=256 * 256, max_steps=100, max_images=4, max_prompt_bytes=64, max_canvas_pixels=512**2
)


def text(s: str | bytes) -> np.ndarray:
    return np.array([s.encode() if isinstance(s, str) else s], dtype=object)


def i32(v: int) -> np.ndarray:
    return np.array([v], dtype=np.int32)


def f32(v: float) -> np.ndarray:
    return np.array([v], dtype=np.float32)


def good(**extra: np.ndarray) -> dict[str, np.ndarray]:
    image = np.zeros((40, 48, 3), np.uint8)
    mask = np.full((40, 48), 255, np.uint8)
    return {"prompt": text("a cat"), "image": image, "mask": mask, **extra}


def parse(inputs: dict[str, np.ndarray]):
    return decode_request(inputs, LIMITS, default_size=64, schedulers=SCHEDULER_NAMES)


def test_defaults_follow_diffusers():
    p = parse(good())
    assert (p.height, p.width) == (40, 48)
    assert (p.steps, p.guidance_scale, p.strength) == (50, 7.5, 1.0)
    assert p.negative_prompt == "" and p.scheduler is None
    assert p.num_images == 1 and p.preserve_unmasked is True
    assert 0 <= p.seed <= MAX_SEED and p.seeds == [p.seed]


def test_every_given_value_is_used():
    p = parse(good(
        negative_prompt=text("blurry"), steps=i32(7), guidance_scale=f32(3.0),
        strength=f32(0.5), seed=np.array([123], np.int64), scheduler=text("Euler_A"),
        num_images=i32(3), preserve_unmasked=np.array([False]),
    ))  # fmt: skip
    assert (p.negative_prompt, p.steps, p.guidance_scale, p.strength) == ("blurry", 7, 3.0, 0.5)
    assert (p.scheduler, p.num_images, p.preserve_unmasked) == ("euler_a", 3, False)
    assert p.seeds == [123, 124, 125]


def test_text_to_image_size():
    p = parse({"prompt": text("x"), "height": i32(72), "width": i32(40)})
    assert (p.height, p.width, p.image, p.mask) == (72, 40, None, None)
    assert (parse({"prompt": text("x")}).height, parse({"prompt": text("x")}).width) == (64, 64)


BAD = [
    ("prompt", {"prompt": None}),
    ("prompt", {"prompt": np.array([1.0], np.float32)}),
    ("prompt", {"prompt": text(b"\xff\xfe bad")}),
    ("prompt", {"prompt": text("x" * 65)}),
    ("prompt", {"prompt": np.array([b"a", b"b"], dtype=object)}),
    ("mask", {"mask": np.zeros((40, 47), np.uint8)}),
    ("mask_blur", {"mask": None, "mask_blur": i32(4)}),  # image-to-image: no mask to blur
    ("mask_blur", {"mask_blur": i32(257)}),
    ("mask", {"mask": np.zeros((40, 48), np.float32)}),
    ("image", {"image": np.zeros((40, 48, 4), np.uint8)}),
    ("image", {"image": np.zeros((0, 0, 3), np.uint8), "mask": np.zeros((0, 0), np.uint8)}),
    ("image", {"image": np.zeros((300, 300, 3), np.uint8), "mask": np.zeros((300, 300), np.uint8)}),
    ("steps", {"steps": i32(0)}),
    ("steps", {"steps": i32(101)}),
    ("steps", {"steps": np.array([5], np.int64)}),
    ("guidance_scale", {"guidance_scale": f32(float("nan"))}),
    ("guidance_scale", {"guidance_scale": f32(-1.0)}),
    ("guidance_scale", {"guidance_scale": f32(float("inf"))}),
    ("strength", {"strength": f32(0.0)}),
    ("strength", {"strength": f32(1.5)}),
    ("strength", {"strength": f32(0.01), "steps": i32(10)}),
    ("seed", {"seed": np.array([-1], np.int64)}),
    ("scheduler", {"scheduler": text("warp_drive")}),
    ("num_images", {"num_images": i32(5)}),
    ("height", {"height": i32(64)}),
    ("outpaint", {"outpaint": np.array([-8, 0, 0, 0], np.int32)}),
    ("outpaint", {"outpaint": np.array([0, 0, 0, 0], np.int32)}),
    ("outpaint", {"outpaint": np.array([9999, 0, 0, 0], np.int32)}),
    ("outpaint", {"outpaint": np.array([8, 0, 0], np.int32)}),
    ("bogus", {"bogus": i32(1)}),
]


def test_an_image_without_a_mask_is_image_to_image():
    inputs = {k: v for k, v in good().items() if k != "mask"}
    params = parse(inputs)
    assert params.mask is None and params.strength == 0.8  # diffusers' img2img default
    assert parse({**inputs, "strength": f32(0.5)}).strength == 0.5


@pytest.mark.parametrize(("name", "change"), BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_names_the_input(name, change):
    inputs = {k: v for k, v in {**good(), **change}.items() if v is not None}
    with pytest.raises(RequestError) as err:
        parse(inputs)
    assert err.value.name == name
    assert str(err.value).startswith(f"{name}: ")


def test_unknown_scheduler_lists_valid_ones():
    with pytest.raises(RequestError, match="valid: " + ", ".join(SCHEDULER_NAMES)):
        parse(good(scheduler=text("nope")))


def served_schedulers(params: dict[str, str]) -> tuple[str, ...]:
    return PipelineSettings.from_parameters(params).schedulers


def test_only_the_models_listed_schedulers_are_accepted():
    allowed = served_schedulers({"schedulers": " Euler, ddim,,"})
    assert allowed == ("euler", "ddim")
    inputs = good(scheduler=text("DDIM "))
    assert decode_request(inputs, LIMITS, default_size=64, schedulers=allowed).scheduler == "ddim"
    with pytest.raises(RequestError) as err:  # known to diffusers, not listed by this model
        decode_request(good(scheduler=text("pndm")), LIMITS, default_size=64, schedulers=allowed)
    assert str(err.value) == "scheduler: 'pndm' is unknown to this model; valid: euler, ddim"
    assert (
        decode_request(good(), LIMITS, default_size=64, schedulers=allowed).scheduler is None
    )  # its own


def test_schedulers_parameter_absent_means_all_and_a_bad_one_fails_at_load():
    assert served_schedulers({}) == SCHEDULER_NAMES
    with pytest.raises(ValueError, match="schedulers: 'ddim,warp_drive' lists unknown warp_drive"):
        served_schedulers({"schedulers": "ddim,warp_drive"})
    with pytest.raises(ValueError, match="lists no name"):
        served_schedulers({"schedulers": " , "})


def test_text_to_image_rejects_strength_below_one_and_lone_mask():
    with pytest.raises(RequestError, match="strength"):
        parse({"prompt": text("x"), "strength": f32(0.5)})
    with pytest.raises(RequestError, match="mask: given without an image"):
        parse({"prompt": text("x"), "mask": np.zeros((8, 8), np.uint8)})


def test_outpaint_request_sizes_the_canvas_and_needs_an_image():
    inputs = good(outpaint=np.array([8, 4, 16, 0], np.int32))
    del inputs["mask"]  # optional when outpainting
    p = parse(inputs)
    assert (p.height, p.width, p.outpaint) == (44, 72, (8, 4, 16, 0))
    with pytest.raises(RequestError, match="outpaint: needs an input image"):
        parse({"prompt": text("x"), "outpaint": np.array([8, 0, 0, 0], np.int32)})
    with pytest.raises(RequestError, match="canvas"):
        parse(good(outpaint=np.array([1000, 1000, 1000, 1000], np.int32)))
