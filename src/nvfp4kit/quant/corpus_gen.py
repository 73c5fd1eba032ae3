"""Generator of the built-in calibration corpus (`assets/calibration/corpus.jsonl`), written for nvfp4kit.

Calibration only needs text that drives the activations the way real use does: prose, chat turns in Gemma 4's
markup (with thinking and tool calls), code, arithmetic, tables and several languages. The prose and the
foreign-language lines below are original; code, math, data and dialogues are assembled from them and from
small templates with a seeded RNG, so the file is reproducible:

    python -m nvfp4kit.quant.corpus_gen src/nvfp4kit/assets/calibration/corpus.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PROSE = [
    "A river delta forms where a slow current drops the sand and silt it has carried for hundreds of kilometres. "
    "Each flood lays down a thin new layer, channels wander across the plain, and over centuries the coastline "
    "creeps seaward. Farmers have always been drawn to these soils, which stay fertile because they are renewed.",
    "Bread rises because yeast eats sugars in the dough and releases carbon dioxide. Kneading lines up gluten "
    "proteins into elastic sheets that trap the gas. A long, cool fermentation gives the yeast and bacteria time "
    "to produce the acids and aromas that make a loaf taste of more than flour and water.",
    "When a city adds a new bus lane, the first weeks often look like failure: drivers complain, buses are still "
    "late, and the lane sits half empty. Transport planners measure over months instead, because riders change "
    "their habits slowly and the timetable needs several revisions before it matches the new travel times.",
    "The heart of a mechanical watch is the balance wheel, a tiny ring that swings back and forth several times a "
    "second. A hairspring pulls it back toward the centre, and the escapement releases the gear train one tooth "
    "per swing. The accuracy of the whole watch depends on how evenly that spring behaves as temperature changes.",
    "Vaccines train the immune system by showing it a harmless piece or copy of a pathogen. Memory cells that form "
    "afterwards can recognise the real invader quickly, so the body responds within days instead of weeks. Booster "
    "doses remind the system when that memory fades or when the virus changes its surface proteins.",
    "In double-entry bookkeeping every transaction is written twice, once as a debit and once as a credit, so the "
    "books always balance. The method spread through Italian trading houses in the fifteenth century and is still "
    "the basis of modern accounting software, which simply hides the second entry from the user.",
    "A compiler reads source code, checks that it follows the rules of the language, and translates it into "
    "instructions for a machine. Between those steps it builds an intermediate representation where it can "
    "remove dead code, keep values in registers and reorder operations, as long as the visible behaviour stays "
    "the same.",
    "Glaciers move because ice under its own weight deforms like a very slow liquid and slides over meltwater at "
    "its base. As they advance they grind the rock beneath them into fine flour, which turns meltwater streams a "
    "milky turquoise. Moraines of piled stones mark where a glacier once stopped and began to retreat.",
    "Good documentation answers the question the reader has right now. A tutorial walks a newcomer through one "
    "working example; a reference lists every option precisely; an explanation says why the design is the way "
    "it is. Mixing the three in one page usually leaves every reader searching for the part they need.",
    "The violin family grew out of earlier bowed instruments in northern Italy during the sixteenth century. Makers "
    "in Cremona refined the shape, the arching of the plates and the varnish, and some of their instruments are "
    "still played in concert halls today, their sound carefully compared with that of modern copies.",
    "Interest rates are the price of borrowing money over time. When a central bank raises its policy rate, "
    "loans become more expensive, people and firms borrow and spend less, and inflation tends to slow after a "
    "delay of a year or more. Lowering the rate works in the other direction, with a similar lag.",
    "Photosynthesis captures light in chlorophyll, splits water, and uses the energy to turn carbon dioxide into "
    "sugar. The oxygen we breathe is the by-product of that water splitting. On land and in the oceans, tiny "
    "cells and giant trees together fix more than a hundred billion tonnes of carbon each year.",
    "Marathon runners learn to pace by feel and by numbers. Starting too fast burns through stored glycogen early, "
    "and the last ten kilometres become a struggle. An even pace, steady drinking and a few practised gels are "
    "less exciting than a fast first half, but they finish races in better times.",
    "A contract needs an offer, an acceptance, something of value exchanged, and parties who are able to agree. "
    "Courts read the words first and the surrounding facts second. Vague terms are usually interpreted against "
    "whoever wrote them, which is why careful drafters define the key words at the start.",
    "Volcanic islands are born at hot spots where plumes of molten rock rise through the mantle. As the ocean plate "
    "drifts over the plume, a chain of islands forms, the oldest ones eroding and sinking while a new volcano "
    "builds at the end of the line. Coral reefs often outlive the islands they once surrounded.",
    "Debugging is easier when the failure can be reproduced on demand. Shrink the input until the bug still "
    "appears, write it down as a test, and only then start changing code. The test keeps the fix honest and "
    "tells the next person exactly what went wrong.",
    "Tea leaves are processed in different ways to make green, oolong and black tea. Green tea is heated soon "
    "after picking to stop oxidation; oolong is bruised and partly oxidised; black tea is rolled and left to "
    "oxidise fully, which darkens the leaf and changes its flavour toward malt and dried fruit.",
    "Satellites in low orbit circle the Earth in about ninety minutes, while geostationary ones sit thirty-six "
    "thousand kilometres up and take exactly one day, so they seem to hang over one spot. Navigation satellites "
    "fly in between and carry atomic clocks whose signals receivers compare to find their position.",
    "A well-designed form asks only for what it needs, in the order people think about it, and explains errors "
    "next to the field that caused them. Each extra question costs some users, and every unclear error message "
    "sends a few of them away for good.",
    "The printing press did not spread ideas by itself; it made books cheaper, and cheaper books found new readers "
    "in cities where literacy was rising. Pamphlets, almanacs and newspapers followed, and within a century "
    "arguments that once travelled by letter could reach thousands of people in weeks.",
    "Memory in a computer is arranged as a hierarchy. Registers are fastest and smallest, then several levels of "
    "cache, then main memory, and finally storage. Programs run quickly when the data they touch next is already "
    "close to the processor, which is why the layout of arrays matters as much as the arithmetic.",
    "Coastal wetlands protect inland areas from storms by slowing waves and soaking up water. They also filter "
    "runoff and shelter young fish. Restoring them is often cheaper than building sea walls, though it takes "
    "years before new marsh grasses hold the mud firmly in place.",
    "Chess openings are sequences of moves studied so deeply that strong players can play the first dozen moves "
    "from memory. What matters more than memorising lines is understanding the plans behind them: which pawn "
    "breaks free the pieces, which squares are weak, and where the king will be safe.",
    "Public libraries lend far more than books. Many offer internet access, language classes, help with job "
    "applications and quiet rooms to study. Their budgets are small compared with their reach, and usage "
    "rises whenever the economy turns down.",
    "Electric motors turn current into motion through magnetic forces between a stator and a rotor. Modern "
    "controllers switch the current thousands of times per second to shape the field precisely, which lets the "
    "same motor run efficiently at low speed in traffic and at high speed on a motorway.",
]

MULTILINGUAL = [
    "Le train de nuit part à vingt-deux heures et arrive à Vienne le lendemain matin. Pensez à réserver une "
    "couchette si vous voulez dormir.",
    "Die Bibliothek ist am Sonntag geschlossen, aber die Rückgabebox vor dem Eingang kann jederzeit benutzt "
    "werden.",
    "El mercado abre temprano; las mejores frutas se venden antes de las nueve y el pescado llega directamente "
    "del puerto.",
    "La riunione è stata spostata a giovedì pomeriggio perché metà del gruppo è ancora in viaggio.",
    "O relatório final precisa de mais dados sobre o consumo de água nas regiões do interior.",
    "Het weer slaat vandaag om: eerst zon, daarna harde wind en regen vanaf de kust.",
    "Поезд задерживается на двадцать минут из-за ремонта путей, просим прощения за неудобства.",
    "Dzisiaj w parku odbywa się koncert orkiestry miejskiej, wstęp jest bezpłatny.",
    "Bu akşam toplantıdan sonra birlikte yemek yiyebiliriz; yakında yeni bir lokanta açıldı.",
    "这座城市的地铁每三分钟一班，高峰时间车厢依然很拥挤。",
    "明日は朝から雨が降る予報なので、傘を忘れないでください。",
    "이 책은 짧지만 내용이 깊어서 천천히 읽는 것이 좋습니다.",
    "यह पुल सौ साल पुराना है, लेकिन आज भी हर दिन हज़ारों लोग इसे पार करते हैं।",
    "تم افتتاح المكتبة الجديدة في وسط المدينة، وهي مفتوحة للجميع حتى منتصف الليل.",
    "Chuyến bay bị hoãn vì sương mù dày đặc ở sân bay.",
    "Kituo cha afya kinafunguliwa saa mbili asubuhi kila siku isipokuwa Jumapili.",
    "Ο καφές εδώ σερβίρεται πάντα με ένα ποτήρι κρύο νερό.",
    "Ez a recept egyszerű, de a tésztának legalább egy órát pihennie kell.",
]

QUESTIONS = [
    "Can you explain this in simpler words?",
    "Summarise the following text in two sentences.",
    "What is the main idea here, and is anything missing?",
    "Rewrite this paragraph for a ten-year-old.",
    "Give me three questions a student could ask about this.",
    "Translate the key point into French.",
]

NAMES = ["alpha", "beta", "count", "total", "items", "index", "value", "result", "buffer", "weights", "score"]
CITIES = ["Lyon", "Osaka", "Nairobi", "Lima", "Oslo", "Pune", "Tartu", "Quito", "Perth", "Graz", "Busan"]
PRODUCTS = [
    "kettle",
    "backpack",
    "lamp",
    "notebook",
    "headphones",
    "bicycle bell",
    "tent",
    "monitor",
    "chair",
]


def _python_snippet(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    n = rng.randint(2, 9)
    templates = [
        f"def moving_average({a}: list[float], window: int = {n}) -> list[float]:\n"
        f'    """Mean of each run of `window` consecutive values."""\n'
        f'    if window <= 0:\n        raise ValueError(f"window must be positive, got {{window}}")\n'
        f"    out = []\n    acc = sum({a}[:window])\n    out.append(acc / window)\n"
        f"    for i in range(window, len({a})):\n        acc += {a}[i] - {a}[i - window]\n"
        f"        out.append(acc / window)\n    return out\n",
        f"class LRUCache:\n    def __init__(self, capacity: int = {n * 16}):\n        self.capacity = capacity\n"
        f"        self.{b} = OrderedDict()\n\n    def get(self, key):\n        if key not in self.{b}:\n"
        f"            return None\n        self.{b}.move_to_end(key)\n        return self.{b}[key]\n\n"
        f"    def put(self, key, value) -> None:\n        self.{b}[key] = value\n        self.{b}.move_to_end(key)\n"
        f"        if len(self.{b}) > self.capacity:\n            self.{b}.popitem(last=False)\n",
        f"import json\nfrom pathlib import Path\n\n\ndef load_{a}(path: Path) -> dict:\n"
        f"    with path.open(encoding='utf-8') as fh:\n        data = json.load(fh)\n"
        f"    return {{k: v for k, v in data.items() if v is not None and k != '{b}'}}\n",
        f"def binary_search({a}, target):\n    lo, hi = 0, len({a}) - 1\n    while lo <= hi:\n"
        f"        mid = (lo + hi) // 2\n        if {a}[mid] == target:\n            return mid\n"
        f"        if {a}[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n\n"
        f"assert binary_search(list(range({n * 10})), {n * 3}) == {n * 3}\n",
    ]
    return rng.choice(templates)


def _other_code(rng: random.Random) -> str:
    city, product = rng.choice(CITIES), rng.choice(PRODUCTS)
    n = rng.randint(3, 40)
    templates = [
        f"SELECT c.name, COUNT(o.id) AS orders, SUM(o.amount) AS revenue\nFROM customers c\n"
        f"JOIN orders o ON o.customer_id = c.id\nWHERE c.city = '{city}' AND o.created_at >= DATE '2024-0{n % 9 + 1}-01'\n"
        f"GROUP BY c.name\nHAVING COUNT(o.id) > {n}\nORDER BY revenue DESC\nLIMIT 20;",
        f"function debounce(fn, ms = {n * 25}) {{\n  let timer = null;\n  return (...args) => {{\n"
        f"    clearTimeout(timer);\n    timer = setTimeout(() => fn(...args), ms);\n  }};\n}}\n\n"
        f"const search = debounce((q) => fetch(`/api/search?q=${{encodeURIComponent(q)}}`));",
        f"fn parse_line(line: &str) -> Option<(String, u32)> {{\n    let mut parts = line.splitn(2, ',');\n"
        f"    let name = parts.next()?.trim().to_string();\n    let qty = parts.next()?.trim().parse().ok()?;\n"
        f'    Some((name, qty))\n}}\n// e.g. "{product}, {n}" -> Some(("{product}", {n}))',
        f"#!/usr/bin/env bash\nset -euo pipefail\nfor f in logs/*.log; do\n"
        f'  grep -c \'ERROR\' "$f" | awk -v name="$f" \'$1 > {n} {{ print name ": " $1 " errors" }}\'\ndone',
        f"#include <stdio.h>\n\nint main(void) {{\n    int table[{n}];\n    for (int i = 0; i < {n}; ++i) {{\n"
        f'        table[i] = i * i;\n    }}\n    printf("%d\\n", table[{n - 1}]);\n    return 0;\n}}',
    ]
    return rng.choice(templates)


def _math(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        price, qty, disc = rng.randint(3, 90), rng.randint(2, 12), rng.choice([5, 10, 15, 20, 25])
        total = price * qty
        final = total * (100 - disc) / 100
        return (
            f"A shop sells a {rng.choice(PRODUCTS)} for ${price}. Someone buys {qty} of them with a {disc}% discount. "
            f"Before the discount the cost is {price} x {qty} = ${total}. The discount removes {disc}% of {total}, "
            f"which is ${total * disc / 100:g}, so the final price is ${final:g}."
        )
    if kind == 1:
        a, b, c = rng.randint(1, 9), rng.randint(-20, 20), rng.randint(-30, 30)
        x = (c - b) / a
        return f"Solve {a}x + {b} = {c}. Subtract {b} from both sides: {a}x = {c - b}. Divide by {a}: x = {x:.4g}."
    if kind == 2:
        d, v = rng.randint(40, 600), rng.randint(30, 120)
        return (
            f"A train travels {d} km at an average speed of {v} km/h. Time = distance / speed = {d}/{v} "
            f"= {d / v:.3f} hours, about {int(d / v)} h {round((d / v % 1) * 60)} min."
        )
    xs = [rng.randint(1, 99) for _ in range(rng.randint(5, 9))]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / len(xs)
    return f"Data: {xs}. Mean = {sum(xs)}/{len(xs)} = {mean:.3f}. Variance = {var:.3f}; standard deviation = {var**0.5:.3f}."


def _data(rng: random.Random) -> str:
    rows = [
        (rng.choice(CITIES), rng.randint(-5, 35), rng.randint(0, 100), rng.random() * 30) for _ in range(6)
    ]
    kind = rng.randrange(3)
    if kind == 0:
        lines = ["city,temp_c,humidity,wind_kmh"] + [f"{c},{t},{h},{w:.1f}" for c, t, h, w in rows]
        return "\n".join(lines)
    if kind == 1:
        head = "| city | temp (°C) | humidity (%) | wind (km/h) |\n|---|---|---|---|\n"
        return head + "\n".join(f"| {c} | {t} | {h} | {w:.1f} |" for c, t, h, w in rows)
    records = [
        {"city": c, "temp_c": t, "humidity": h, "wind_kmh": round(w, 1), "alert": t > 30}
        for c, t, h, w in rows
    ]
    return json.dumps(
        {"station_reports": records, "count": len(records)}, ensure_ascii=False, indent=rng.choice([None, 2])
    )


def _turn(role: str, text: str) -> str:
    return f"<|turn>{role}\n{text}<turn|>\n"


def _chat(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        text = rng.choice(PROSE)
        return _turn("user", f"{rng.choice(QUESTIONS)}\n\n{text}") + _turn("model", text.split(". ")[0] + ".")
    if kind == 1:
        problem = _math(rng)
        question, _, answer = problem.partition(". ")
        thought = f"<|channel>thought\nWork it step by step: {answer[:120]}<channel|>"
        return _turn("system", "<|think|>") + _turn("user", question + "?") + _turn("model", thought + answer)
    if kind == 2:
        city = rng.choice(CITIES)
        days = rng.randint(1, 5)
        call = f'<|tool_call>call:get_weather{{city:<|"|>{city}<|"|>,days:{days}}}<tool_call|>'
        result = f'<|tool_response>response:get_weather{{temp_c:{rng.randint(-5, 35)},sky:<|"|>cloudy<|"|>}}<tool_response|>'
        return _turn("user", f"What will the weather be like in {city} for the next {days} days?") + _turn(
            "model", f"{call}{result}Expect clouds in {city}; take a light jacket."
        )
    return _turn("user", "Write a small function for this and explain it briefly.") + _turn(
        "model", "```python\n" + _python_snippet(rng) + "```\nIt checks its input and runs in linear time."
    )


def generate(seed: int = 4, target_bytes: int = 240_000) -> list[str]:
    rng = random.Random(seed)
    docs = list(PROSE) + [" ".join(rng.sample(MULTILINGUAL, 6)) for _ in range(12)]
    makers = [_python_snippet, _other_code, _math, _data, _chat, _chat]
    size = sum(len(d.encode()) for d in docs)
    while size < target_bytes:
        doc = "\n\n".join(rng.choice(makers)(rng) for _ in range(rng.randint(2, 4)))
        docs.append(doc)
        size += len(doc.encode())
    rng.shuffle(docs)
    return docs


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nvfp4kit.quant.corpus_gen OUTPUT.jsonl", file=sys.stderr)
        return 2
    out = Path(args[0])
    with out.open("w", encoding="utf-8") as fh:
        for doc in generate():
            fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
