r"""Generate with a trained M6: captions of images or continuations of text (KV cache).

  python experiments/generate.py --workdir=/tmp/m6                      # held-out digits
  python experiments/generate.py --workdir=/tmp/m6 --image=digit.png --lang=zh
  python experiments/generate.py --workdir=/tmp/m6 --prompt="今天天气" --strategy=sample \
      --temperature=0.8 --top_p=0.9 --num_samples=3
  python experiments/generate.py --workdir=/tmp/m6 --strategy=beam --beam_size=4
  python experiments/generate.py --workdir=/tmp/t2i --text=画一个数字七 --out=grid.png \
      --strategy=mask --num_samples=16     # a text-to-image run (configs/m6_t2i.py)

Reads the config stored with the newest checkpoint of --workdir, its params and the
run's tokenizer. --image: any PNG/JPEG, converted to the run's channels, resized to
data.image_size and scaled as the run's training images (for a run on the shipped
digits, light backgrounds are inverted unless --invert=no: the digits are bright ink on
black; a run on your own images sees them as they are unless --invert=yes). --prompt: text
continued as in the lm task (prefix [<lm>], the text attends causally).
"""
import os
import sys

# Runnable as a script from a clone without installing: make `m6jax` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m6jax import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A pretraining run's --workdir.")
flags.mark_flags_as_required(["workdir"])
_IMAGE = flags.DEFINE_string("image", "", "Image file to caption.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (text only).")
_STRATEGY = flags.DEFINE_enum("strategy", "greedy", ["greedy", "sample", "beam", "mask"],
                              "Decoding (mask: parallel MaskGIT decoding, --text only).")
_LANG = flags.DEFINE_enum("lang", "en", ["en", "zh"], "Caption language.")
_MAX_NEW = flags.DEFINE_integer("max_new", 0, "New tokens; 0 = 16 for captions, as many as "
                                "fit data.text_len for --prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 4, "Beams for --strategy=beam.")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.6, "GNMT alpha for beam search.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Outputs per image/prompt (sampling).")
_NUM_DIGITS = flags.DEFINE_integer("num_digits", 8, "Held-out digits to caption.")
# Text-to-image (m6jax/t2i/cli.py).
_TEXT = flags.DEFINE_string("text", "", "Prompt to draw (a text-to-image run); needs --out.")
_OUT = flags.DEFINE_string("out", "", "PNG file for the grid of --text images.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", -1.0, "Classifier-free guidance for --text "
                               "(1 = off; < 0 = the run's t2i.guidance_scale).")
_MASK_STEPS = flags.DEFINE_integer("mask_steps", 0, "Parallel steps of --strategy=mask "
                                   "(0 = the run's t2i.mask_steps).")
_INVERT = flags.DEFINE_enum("invert", "auto", ["auto", "yes", "no"],
                            "Invert --image (auto: if its mean is above 0.5 and the run "
                            "trained on the shipped digits).")
_SHOW_INPUT = flags.DEFINE_string("show_input", "", "Write the image grid(s) the model "
                                  "receives (after resizing, greying, inverting) to this PNG.")


def load_image_patches(path: str, data_cfg, invert: str):
    """--image -> patches f32 [P, patch_dim] as the run's training images; one-line refusals."""
    from m6jax.data import images
    try:  # (a missing file was refused by _check_flags)
        return images.model_input(os.path.abspath(path), data_cfg, invert)
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        cli.refuse(f"flag error: --image={path} cannot be read as an image ({type(e).__name__}: "
                   f"{e}); give a PNG or JPEG file")


def _caption_lang(langs: set[str] | None) -> str:
    """--lang, which must be a language the run's captions have (`langs`; None = the
    shipped digits, captioned in both): a caption prompt in a language the model never
    saw captioned comes out in the other one. Without --lang, the run's only language."""
    if langs is None or _LANG.value in langs or not langs:
        return _LANG.value
    if not _LANG.present:
        print(f"--lang={sorted(langs)[0]}: this run's captions are all {sorted(langs)[0]}")
        return sorted(langs)[0]
    cli.refuse(f"flag error: --lang={_LANG.value}: this run's captions (data.image_text_files) "
               f"are all {', '.join(sorted(langs))}; use --lang={sorted(langs)[0]}")


def _check_flags():
    """Flag values that make no decoding, refused before JAX is imported."""
    if _TEXT.value and (_IMAGE.value or _PROMPT.value or not _OUT.value
                        or _STRATEGY.value == "beam"):
        cli.refuse("flag error: --text draws images: give it with --out=PATH.png, without "
                   "--image/--prompt, and --strategy greedy, sample or mask")
    if _STRATEGY.value == "mask" and not _TEXT.value:
        cli.refuse("flag error: --strategy=mask decodes image codes: use it with --text")
    if _IMAGE.value and _PROMPT.value:
        cli.refuse("flag error: give --image (caption it) or --prompt (continue the text), "
                   "not both")
    for flag, ok, want in (
            (_NUM_SAMPLES, _NUM_SAMPLES.value >= 1, ">= 1"),
            (_BEAM_SIZE, _BEAM_SIZE.value >= 1, ">= 1"),
            (_NUM_DIGITS, _NUM_DIGITS.value >= 1, ">= 1"),
            (_MAX_NEW, _MAX_NEW.value >= 0, ">= 0 (0 = the default length)"),
            (_TEMPERATURE, _TEMPERATURE.value >= 0, ">= 0 (0 = greedy)"),
            (_TOP_K, _TOP_K.value >= 0, ">= 0 (0 = all tokens)"),
            (_TOP_P, 0 < _TOP_P.value <= 1, "in (0, 1]"),
            (_LENGTH_PENALTY, _LENGTH_PENALTY.value >= 0, ">= 0")):
        if not ok:
            cli.refuse(f"flag error: --{flag.name}={flag.value} must be {want}")
    if _STRATEGY.value == "beam" and _NUM_SAMPLES.value > _BEAM_SIZE.value:
        cli.refuse(f"flag error: --num_samples={_NUM_SAMPLES.value} with --strategy=beam prints "
                   f"the best beams, at most --beam_size={_BEAM_SIZE.value}; raise --beam_size")
    if _IMAGE.value:
        if not os.path.isfile(_IMAGE.value):
            cli.refuse(f"flag error: --image={_IMAGE.value}: no such file")
        from PIL import Image
        try:
            with Image.open(_IMAGE.value) as im:
                im.verify()
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError: OSError
            cli.refuse(f"flag error: --image={_IMAGE.value} cannot be read as an image "
                       f"({type(e).__name__}: {e}); give a PNG or JPEG file")
    if not os.path.isdir(_WORKDIR.value):
        cli.refuse(f"flag error: --workdir={_WORKDIR.value} is not a directory; give the "
                   "--workdir of a pretraining run (experiments/pretrain.py)")


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}; flags are --name=value")
    _check_flags()
    import jax
    import numpy as np

    from m6jax import generate, sharding
    from m6jax.data import tokenizer as tokenizer_lib
    from m6jax.decoding.run import load_run

    workdir = os.path.abspath(_WORKDIR.value)
    if _TEXT.value:
        from m6jax.t2i.cli import generate_images
        generate_images(workdir, _TEXT.value, _OUT.value, _STRATEGY.value, _NUM_SAMPLES.value,
                        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                        guidance_scale=_GUIDANCE.value, mask_steps=_MASK_STEPS.value,
                        seed=_SEED.value)
        return
    try:
        config, model, mesh, params, param_sh, step_dir = load_run(workdir)
    except ValueError as e:
        cli.refuse(f"input error: {e}")
    d = config.data
    num_patches = (d.image_size // d.patch_size) ** 2
    patch_dim = d.patch_size ** 2 * d.image_channels
    tok_path = d.tokenizer_path or os.path.join(workdir, "tokenizer.model")
    if not os.path.isfile(tok_path):
        cli.refuse(f"input error: no tokenizer at {tok_path}: the run's pretraining writes it there")
    tok = tokenizer_lib.Tokenizer(tok_path)

    # ---- What to decode: rows of (patches, image_mask), one prompt for all.
    labels = None
    if _PROMPT.value:
        prompt = [tok.lm_id] + tok.encode(_PROMPT.value)
        if len(prompt) > d.text_len:
            cli.refuse(f"flag error: --prompt is {len(prompt) - 1} tokens; data.text_len={d.text_len} of this "
                     f"run fits at most {d.text_len - 1}: shorten it")
        num_prefix, patches = 1, np.zeros((1, num_patches, patch_dim), np.float32)
        image_mask = np.zeros((1, num_patches), bool)
        max_new = _MAX_NEW.value or d.text_len - len(prompt) + 1
    else:
        pipe = None
        if not _IMAGE.value or d.image_text_files:  # the run's data: held-out images, languages
            from m6jax.data import Pipeline
            from m6jax.errors import InputError
            try:
                pipe = Pipeline(d, seed=config.seed, batch_size=1, workdir=workdir)
            except InputError as e:
                cli.refuse(f"input error: {e}")
        lang = _caption_lang(pipe.caption_langs() if d.image_text_files else None)
        prompt, num_prefix = [tok.caption_id, tok.lang_id(lang)], None
        if _IMAGE.value:
            patches = load_image_patches(_IMAGE.value, d, _INVERT.value)[None]
        else:
            try:
                patches, _, labels = pipe.caption_eval_set()
            except InputError as e:
                cli.refuse(f"input error: {e}")
            patches, labels = patches[:_NUM_DIGITS.value], labels[:_NUM_DIGITS.value]
        image_mask = np.ones(patches.shape[:2], bool)
        max_new = _MAX_NEW.value or min(16, d.text_len - len(prompt) + 1)
    if _SHOW_INPUT.value and not _PROMPT.value:
        from m6jax.data import images
        images.save_model_input(_SHOW_INPUT.value, patches, d)
    reps = _NUM_SAMPLES.value
    # Beam search returns its `reps` best beams per row; the other strategies draw `reps`
    # times from repeated rows.
    rows = 1 if _STRATEGY.value == "beam" else reps
    patches, image_mask = np.repeat(patches, rows, 0), np.repeat(image_mask, rows, 0)
    prompts = np.repeat(np.asarray(prompt, np.int32)[None], len(patches), 0)

    try:
        decode = generate.make_decoder(
            model, mesh, param_sh, len(prompt), max_new, tok.eos_id, tok.pad_id,
            strategy=_STRATEGY.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
            top_p=_TOP_P.value, beam_size=_BEAM_SIZE.value,
            length_penalty=_LENGTH_PENALTY.value, num_prefix=num_prefix,
            num_beams_returned=reps if _STRATEGY.value == "beam" else 1)
    except ValueError as e:
        cli.refuse(f"flag error: {e}")
    (patches, image_mask, prompts), n = generate.pad_rows(
        [patches, image_mask, prompts], sharding.batch_shards(mesh))
    b = sharding.shard_full_batch(mesh, dict(p=patches, m=image_mask, t=prompts))
    with jax.set_mesh(mesh):
        tokens = np.asarray(jax.device_get(decode(params, b["p"], b["m"], b["t"],
                                                  jax.random.key(_SEED.value))))
    tokens = tokens[:n * (reps // rows)]
    texts = [tok.decode(row.tolist()) for row in tokens]

    # ---- Print.
    step = os.path.basename(step_dir)
    print(f"step {step} of {workdir} | {_STRATEGY.value} | {max_new} new tokens max")
    for i, text in enumerate(texts):
        k = i // reps
        if _PROMPT.value:
            print(f"{_PROMPT.value}|{text}")
        elif labels is not None:
            print(f"digit {labels[k]}: {text}" if labels[k] >= 0 else f"held-out {k}: {text}")
        else:
            print(f"{os.path.basename(_IMAGE.value)}: {text}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
