"""Small text formatting helpers shared by the panels (no Textual here: easy to test)."""

from __future__ import annotations

MiB = 1024**2
_BLOCKS = " ▏▎▍▌▋▊▉█"


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'; binary units, one decimal."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def bar(fraction: float, width: int) -> str:
    """A horizontal bar `width` cells wide, filled to `fraction` with eighth-cell precision."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (_BLOCKS[part] if part else "")
    return text.ljust(width)


def visible_token(text: str) -> str:
    """A token as it should appear in a table: whitespace and control characters made visible."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out) or "∅"


_SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def subscript(number: int) -> str:
    """12 → '₁₂': token ids drawn small after their chips."""
    return str(number).translate(_SUBSCRIPT)


_CONTROL_PICTURES = {i: 0x2400 + i for i in range(32) if chr(i) not in "\n\t"} | {127: 0x2421}


def printable(text: str) -> str:
    """Model output made safe to draw: C0 control characters (an ESC could drive the terminal)
    become their Unicode control pictures (␛, ␑ …); newlines and tabs stay."""
    return text.translate(_CONTROL_PICTURES)
