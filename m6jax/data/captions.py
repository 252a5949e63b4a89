"""Caption templates for the digits images and the parser that reads a class back.

Templates hold no class word of either language (no "one" in "someone", no 一 in
"一个"), so a caption names exactly one class and `caption_class` can score generated
captions as a 10-way classifier.
"""
import re

CLASS_WORDS = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "zh": ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九"),
}
TEMPLATES = {
    "en": ("a handwritten digit {}", "the number {}", "this image shows a {}"),
    "zh": ("手写数字{}", "这是数字{}", "图中的数字是{}"),
}
LANGS = ("zh", "en")

_EN_WORD = re.compile(r"\b(" + "|".join(CLASS_WORDS["en"]) + r")\b")
_CJK = re.compile(r"[\u3400-\u9fff]")


def digit_captions(label: int) -> tuple[list[str], list[str]]:
    """All captions of digit `label` and their languages, zh templates first."""
    captions, langs = [], []
    for lang in LANGS:
        for template in TEMPLATES[lang]:
            captions.append(template.format(CLASS_WORDS[lang][label]))
            langs.append(lang)
    return captions, langs


def detect_lang(text: str) -> str:
    """'zh' if the text contains a CJK ideograph, else 'en' (for captions without `lang`)."""
    return "zh" if _CJK.search(text) else "en"


def caption_class(text: str, lang: str) -> int | None:
    """The digit class named in a caption, or None unless exactly one class word appears.

    English matches whole words case-insensitively ("someone" is not "one"); Chinese
    matches the characters 零..九 anywhere. A class word repeated still counts once.
    """
    if lang == "en":
        found = {CLASS_WORDS["en"].index(w) for w in _EN_WORD.findall(text.lower())}
    elif lang == "zh":
        found = {i for i, ch in enumerate(CLASS_WORDS["zh"]) if ch in text}
    else:
        raise ValueError(f"lang={lang!r} is not one of {LANGS}")
    return found.pop() if len(found) == 1 else None
