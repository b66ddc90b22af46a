"""The embedded demo: a synthetic product catalog in the real data's format, with images to serve.

Price = category base x size (both in the text) x tier (only in the photo), rounded to a shelf price
(x.99, x.49): text alone explains part of it and the image the rest. The tier is the photo's background
colour (basic grey x0.4, standard blue x1, premium gold x2.6); the boxes drawn on it are decoration.
The price table is small (14 categories x 3 sizes x 3 tiers) so that the tiny demo model can learn it
on a CPU in minutes. A fixed seed makes every file identical from run to run.
"""
from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from common.fsio import write_bytes, write_json

# (category, nouns, unit, typical value, base price in USD at the typical value)
CATEGORIES = [
    ("Coffee", ["Whole Bean Coffee", "Ground Coffee", "Espresso Roast"], "Ounce", 12, 11.0),
    ("Tea", ["Green Tea Bags", "Herbal Tea", "Black Tea Bags"], "Count", 40, 6.5),
    ("Olive Oil", ["Extra Virgin Olive Oil", "Olive Oil Spray"], "Fl Oz", 16, 13.0),
    ("Hot Sauce", ["Hot Sauce", "Chili Sauce", "Sriracha"], "Fl Oz", 5, 4.0),
    ("Pasta", ["Spaghetti", "Penne Pasta", "Fusilli"], "Ounce", 16, 2.2),
    ("Vitamins", ["Vitamin D3 Softgels", "Multivitamin Gummies", "Fish Oil Capsules"], "Count", 90, 17.0),
    ("Protein", ["Whey Protein Powder", "Plant Protein Powder"], "Pound", 2, 34.0),
    ("Spices", ["Ground Cinnamon", "Smoked Paprika", "Black Peppercorns"], "Ounce", 3, 5.5),
    ("Snacks", ["Trail Mix", "Protein Bars", "Rice Crackers"], "Ounce", 10, 7.0),
    ("Candy", ["Dark Chocolate Bar", "Gummy Bears", "Peppermint Candy"], "Ounce", 6, 3.5),
    ("Baking", ["Almond Flour", "Baking Soda", "Vanilla Extract"], "Ounce", 16, 8.0),
    ("Pet", ["Dog Treats", "Cat Food", "Bird Seed"], "Pound", 3, 15.0),
    ("Cleaning", ["Dish Soap", "Laundry Pods", "Glass Cleaner"], "Count", 30, 9.5),
    ("Beauty", ["Face Serum", "Shampoo", "Body Lotion"], "Fl Oz", 8, 21.0),
]
BRANDS = ["Acme", "Northwind", "Bluebird", "Green Valley", "Sunrise", "Maison Dupré", "Kōji Farms",
          "Old Mill", "Peak", "Tierra Sabrosa", "Nordic Crest", "Happy Paws"]
ADJECTIVES = ["Organic", "Premium", "Classic", "Natural", "Gluten Free", "Family Size", "Non-GMO",
              "Kosher", "Fair Trade", "Low Sodium", "Vegan", "Unsweetened"]
BULLETS = ["Made with simple, high quality ingredients", "Resealable package keeps it fresh",
           "Great for everyday use at home or in the office", "Sourced from trusted growers",
           "No artificial colors or flavors", "Satisfaction guaranteed – or your money back",
           "Perfect gift for friends & family", "Packed in a facility that also processes nuts"]
# Only in the photo: background colour = tier, number of boxes = pack count.
TIERS = [("basic", (150, 150, 150), 0.4), ("standard", (40, 90, 200), 1.0), ("premium", (212, 175, 55), 2.6)]
PACKS = [1, 2, 3]
FAILING_LINKS = ["/fault/404/{id}.jpg", "/fault/500/{id}.jpg", "/fault/notimage/{id}.jpg"]


@dataclass
class DemoRow:
    sample_id: str
    catalog_content: str
    image_name: str | None  # None: the row's link fails on purpose
    failing_path: str | None
    price: float
    tier: int
    pack: int
    image_spec: tuple       # (width, height, kind) kind in jpeg | png_alpha | gray


def _catalog_text(rng: random.Random, cat, value: float | None) -> str:
    name, nouns, unit, typical, _ = cat
    noun = rng.choice(nouns)
    brand = rng.choice(BRANDS)
    adj = rng.choice(ADJECTIVES)
    size = f"{value:g} {unit}" if value is not None else "Assorted"
    lines = [f"Item Name: {brand} {adj} {noun}, {size}"]
    n_bullets = rng.choice([0, 0, 2, 3, 5])
    if n_bullets and rng.random() < 0.1:
        lines.append(f"Bullet Point: {rng.choice(BULLETS)}")
    else:
        for i in range(n_bullets):
            lines.append(f"Bullet Point {i + 1}: {rng.choice(BULLETS)}")
    if rng.random() < 0.45:
        desc = f"{brand} {noun.lower()} in the {name.lower()} aisle. {rng.choice(BULLETS)}."
        if rng.random() < 0.25:
            desc = desc.replace(". ", ".<br><br>", 1) + " <b>Enjoy!</b>"
        lines.append(f"Product Description: {desc}")
    lines.append(f"Value: {value:.1f}" if value is not None else "Value: nan")
    lines.append(f"Unit: {unit}" if value is not None else "Unit: None")
    return "\n".join(lines) + "\n"


def shelf_price(p: float) -> float:
    """The way shops write prices: 12.99 above ten dollars, 4.49 / 4.99 below, cents under one dollar."""
    if p >= 10:
        return round(p) - 0.01
    if p >= 1:
        return max(0.99, round(p * 2) / 2 - 0.01)
    return round(p, 2)


def make_rows(n: int, seed: int, id_offset: int, with_failures: bool) -> list[DemoRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cat = rng.choice(CATEGORIES)
        typical, base = cat[3], cat[4]
        value = round(typical * rng.choice([0.5, 1, 1, 2]), 1) if rng.random() > 0.05 else None
        tier = rng.choices(range(3), weights=[3, 5, 2])[0]
        pack_index = rng.choices(range(3), weights=[6, 3, 2])[0]
        size_factor = (value / typical) ** 0.75 if value is not None else 1.0
        price = shelf_price(1.8 * base * size_factor * TIERS[tier][2])
        sid = str(id_offset + i)
        kind = rng.choices(["jpeg", "png_alpha", "gray"], weights=[85, 10, 5])[0]
        w, h = rng.choice([(640, 480), (480, 640), (500, 500), (1600, 1200), (1024, 300), (300, 900),
                           (60, 45), (800, 800)])
        failing = None
        if with_failures and rng.random() < 0.02:
            failing = rng.choice(FAILING_LINKS).format(id=sid)
        ext = "png" if kind == "png_alpha" else "jpg"
        rows.append(DemoRow(sid, _catalog_text(rng, cat, value), None if failing else f"{sid}.{ext}",
                            failing, price, tier, PACKS[pack_index], (w, h, kind)))
    return rows


def draw_image(row: DemoRow) -> bytes:
    w, h, kind = row.image_spec
    colour = TIERS[row.tier][1]
    img = Image.new("RGB", (w, h), colour)
    draw = ImageDraw.Draw(img)
    box_w = max(2, w // (2 * row.pack + 1))
    box_h = max(2, h // 3)
    for k in range(row.pack):
        x0 = box_w * (2 * k + 1) // 1
        draw.rectangle([x0, box_h, x0 + box_w - 1, 2 * box_h], fill=(245, 245, 245), outline=(20, 20, 20))
    out = io.BytesIO()
    if kind == "png_alpha":
        rgba = img.convert("RGBA")
        alpha = Image.new("L", (w, h), 255)
        ImageDraw.Draw(alpha).rectangle([0, 0, w // 8, h // 8], fill=0)  # a transparent corner
        rgba.putalpha(alpha)
        rgba.save(out, "PNG")
    elif kind == "gray":
        img.convert("L").save(out, "JPEG", quality=90)
    else:
        img.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_demo(out_dir: Path | str, base_url: str, train_rows: int = 3000, test_rows: int = 300,
               seed: int = 0) -> dict:
    """Write `train.csv`, `test.csv` and `images/` under out_dir; links point at base_url (the server)."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": make_rows(train_rows, seed, 100000, True),
              "test": make_rows(test_rows, seed + 1, 900000, True)}
    for split, rows in splits.items():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["sample_id", "catalog_content", "image_link"] + (["price"] if split == "train" else [])
        writer.writerow(header)
        for r in rows:
            link = base_url + (r.failing_path if r.failing_path else f"/img/{r.image_name}")
            writer.writerow([r.sample_id, r.catalog_content, link] + ([f"{r.price:.2f}"] if split == "train" else []))
            if r.image_name and not (image_dir / r.image_name).exists():
                write_bytes(image_dir / r.image_name, draw_image(r))
        write_bytes(out_dir / f"{split}.csv", buf.getvalue().encode("utf-8"))
    truth = {r.sample_id: r.price for r in splits["test"]}
    write_json(out_dir / "test_truth.json", truth)  # for checking predictions on the demo only
    info = {"train_rows": train_rows, "test_rows": test_rows, "seed": seed, "base_url": base_url}
    write_json(out_dir / "demo.json", info)
    return info


def is_demo_work(work_dir: Path) -> bool:
    """Whether 3_create_jsonl.py read the demo's catalog (its folder holds demo.json) into this work folder."""
    from common import layout
    from common.fsio import read_json
    stats = layout.jsonl_dir(work_dir) / "stats.json"
    return stats.exists() and (Path(read_json(stats)["options"]["data_dir"]) / "demo.json").exists()


def tokenizer_corpus() -> list[str]:
    """Text the tiny demo tokenizer is trained on: the demo's own vocabulary plus digits and punctuation."""
    rows = make_rows(400, 12345, 0, False)
    words = [" ".join(c[1]) + " " + c[0] + " " + c[2] for c in CATEGORIES]
    return [r.catalog_content for r in rows] + words + BRANDS + ADJECTIVES + BULLETS + [
        "0123456789 . , $ USD price 12.99 3.50 100.00"]


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Write the synthetic demo catalog (train.csv, test.csv, images/).")
    ap.add_argument("--out", type=Path, default=Path("work/demo"), help="folder to write the demo data to")
    ap.add_argument("--base-url", default="http://127.0.0.1:8765", help="where the image server will listen")
    ap.add_argument("--train-rows", type=int, default=3000, help="rows in train.csv")
    ap.add_argument("--test-rows", type=int, default=300, help="rows in test.csv")
    ap.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    args = ap.parse_args()
    info = write_demo(args.out, args.base_url, args.train_rows, args.test_rows, args.seed)
    print(f"demo catalog written to {args.out}: {info}")


if __name__ == "__main__":
    main()
