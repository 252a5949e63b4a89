"""Real photographs that ship inside scikit-image, with captions we wrote, as a folder.

`photo_folder(dir)` copies scikit-image's sample photographs (its `skimage/data`
directory, no download) into `dir` and writes `dir/captions.tsv` (the folder format:
`image<TAB>english<TAB>chinese`). `copies` > 1 repeats each photo under new names (for
throughput measurements that need more records than 20); `ext=".jpg"` re-encodes them
as JPEG (quality 90), the usual encoding of web-scale photo datasets.
"""
import importlib.util
import os
import shutil

from m6jax.data.corpora import default_cache_dir

# file -> (English caption, Chinese caption). Only photographs and photo-like scans.
CAPTIONS = {
    "astronaut.png": ("an astronaut in a white space suit in front of a flag", "身穿白色宇航服的宇航员站在旗帜前"),
    "chelsea.png": ("a tabby cat looking to the side", "一只虎斑猫看向一旁"),
    "coffee.png": ("a cup of coffee on a saucer with a spoon", "一杯放在碟子上的咖啡和勺子"),
    "rocket.jpg": ("a rocket on the launch pad under a blue sky", "蓝天下发射台上的火箭"),
    "hubble_deep_field.jpg": ("distant galaxies in a deep field telescope image", "深空望远镜图像中的遥远星系"),
    "retina.jpg": ("a photograph of the back of a human eye", "人眼底部的照片"),
    "motorcycle_left.png": ("a red motorcycle seen from the left camera", "左侧相机拍到的红色摩托车"),
    "motorcycle_right.png": ("a red motorcycle seen from the right camera", "右侧相机拍到的红色摩托车"),
    "ihc.png": ("a stained tissue sample under a microscope", "显微镜下染色的组织样本"),
    "camera.png": ("a man with a camera on a tripod in a field", "草地上用三脚架拍照的男人"),
    "moon.png": ("the cratered surface of the moon", "布满陨石坑的月球表面"),
    "coins.png": ("old coins lying on a dark table", "放在深色桌面上的旧硬币"),
    "page.png": ("a printed page of text in uneven light", "光线不均的一页印刷文字"),
    "text.png": ("handwritten text on a sheet of paper", "纸上的手写文字"),
    "brick.png": ("a brick wall seen up close", "近看的一面砖墙"),
    "grass.png": ("a close view of green grass", "近看的一片草地"),
    "gravel.png": ("small stones of gravel on the ground", "地上的碎石子"),
    "cell.png": ("a living cell under a microscope", "显微镜下的活细胞"),
    "clock_motion.png": ("a wall clock blurred by motion", "因运动而模糊的挂钟"),
    "color.png": ("a chart of colour patches", "一张色块图"),
}


def data_dir() -> str:
    """scikit-image's bundled data directory (found without importing skimage)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise ImportError("scikit-image is not installed; pip install -r requirements.txt")
    return os.path.join(os.path.dirname(spec.origin), "data")


def photo_folder(out_dir: str, copies: int = 1, ext: str = "") -> str:
    """Writes the photos and `captions.tsv` into `out_dir`; returns the captions path."""
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for copy in range(copies):
        for name, (en, zh) in CAPTIONS.items():
            stem, src_ext = os.path.splitext(name)
            target = f"{stem}_{copy}{ext or src_ext}" if copies > 1 else stem + (ext or src_ext)
            path = os.path.join(out_dir, target)
            if not os.path.exists(path):
                src = os.path.join(data_dir(), name)
                if ext and ext != src_ext:
                    with Image.open(src) as im:
                        im.convert("RGB").save(path, quality=90)
                else:
                    shutil.copyfile(src, path)
            lines.append(f"{target}\t{en}\t{zh}\n")
    captions = os.path.join(out_dir, "captions.tsv")
    with open(captions, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return captions


def photo_shards(cache_dir: str | None = None, fmt: str = "webdataset", per_shard: int = 5) -> str:
    """The photos as shards under `cache_dir`/photos (written once); returns their glob."""
    from m6jax.data import shards
    root = os.path.join(cache_dir or default_cache_dir(), "photos")
    ext = "tar" if fmt == "webdataset" else "parquet"
    out = os.path.join(root, fmt)
    if not os.path.isdir(out) or not any(f.endswith(ext) for f in os.listdir(out)):
        captions = photo_folder(os.path.join(root, "folder"))
        records = shards.read_captions(captions, os.path.dirname(captions))
        tmp = f"{out}.tmp{os.getpid()}"
        shards.write_shards(records, tmp, fmt, per_shard)
        try:
            os.replace(tmp, out)
        except OSError:  # another host's rename won; its shards are the same
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out, f"shard-*.{ext}")
