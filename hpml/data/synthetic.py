"""Generated SQuAD v2 and SST-2 look-alikes: deterministic, learnable by a small pretrained model, no download."""
from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

# ---- SQuAD v2 --------------------------------------------------------------------------------------------
_SYLLABLES = ["bel", "or", "ka", "stin", "ve", "lor", "dun", "mar", "tes", "ari", "quin", "zo", "hal", "em",
              "rid", "gar", "sol", "fen", "ith", "bra", "mo", "nel", "tor", "ul", "cav", "sy", "dra", "pel"]
_PLACE_WORDS = ["", "", "", "", "Upper ", "New ", "Old "]
# attribute as named in text -> (article written before the value, outside the answer span; marker word).
# A value is its attribute's marker word and a made-up name ("Fort Belkast", "the River Ornel"), so the skill
# is "the question names X: answer with the span that starts at X's marker and runs to the end of the name",
# and it carries over to dev, whose names are all new. Measured (docs/benchmarks.md): MiniLM's first two
# layers learn it in 300 steps (+15-20 EM over all-no-answer); with closed sets of everyday values instead
# (wheat, copper, ...) the same model still answered nothing after 300 steps. A randomly initialised 2-layer
# BERT learns neither within 1,200 steps: it is for shapes and speed, not for accuracy.
_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "capital": ("", "Fort"),
    "longest river": ("the ", "River"),
    "highest peak": ("", "Mount"),
    "largest lake": ("", "Lake"),
    "main harbor": ("", "Port"),
    "founder": ("", "King"),
    "patron saint": ("", "Saint"),
    "ruling family": ("", "House"),
    "national hero": ("", "General"),
    "oldest abbey": ("the ", "Abbey"),
    "southern cape": ("", "Cape"),
    "largest island": ("the ", "Isle"),
}


def _value(rng: random.Random, attr: str) -> str:
    return f"{_ATTRIBUTES[attr][1]} {_name(rng, rng.choice([2, 2, 3]))}"


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


# Facts and questions each have a main phrasing and rarer variants (as weights by repetition): one fixed
# shape lets the tiny model find the attribute by position, the variants keep it from being the only way.
_FACTS = ["The {attr} of {ent} is {art}{val}."] * 6 + ["{ent}'s {attr} is {art}{val}."]
_QUESTIONS = ["What is the {attr} of {ent}?"] * 6 + ["What is {ent}'s {attr}?", "Which {attr} does {ent} have?"]
# Filler: sentences about the context's places that state no attribute, to give SQuAD-like lengths and make
# the fact sentences appear anywhere.
_FILLER = [
    "Travelers reach {ent} by a narrow road that winds through {adj} hills.",
    "Most people in {ent} work in farming, fishing or small trades.",
    "{ent} was once part of a larger kingdom that stretched to the sea.",
    "The winters in {ent} are long and cold, and the summers are short but bright.",
    "Historians still argue about how {ent} got its name.",
    "Many visitors from {other} come to {ent} for its weekly markets.",
    "A stone wall built centuries ago still surrounds the old quarter of {ent}.",
    "In recent years {ent} has grown quickly as new families settled there.",
    "Trade between {ent} and {other} has been steady for generations.",
    "The roads of {ent} are lined with {adj} houses and small gardens.",
    "Several old churches and a library stand near the main square of {ent}.",
    "During the war, {ent} was occupied twice and rebuilt each time.",
    "Local legends in {ent} tell of a giant who slept under the hills.",
    "{ent} is known across the region for its {adj} bread and strong cider.",
    "Schools in {ent} teach both the local dialect and the language of {other}.",
    "A railway line opened in {ent} in the last century, linking it to {other}.",
]
_ADJ = ["green", "quiet", "steep", "rocky", "narrow", "gentle", "windy", "painted", "famous", "sunny"]


def _qid(split: str, seed: int, n: int) -> str:
    # 24 hex digits like SQuAD ids; the split is part of the hash so train and dev never share an id.
    return hashlib.sha1(f"{split}/{seed}/{n}".encode()).hexdigest()[:24]


def _target_chars(rng: random.Random) -> int:
    # About 4.3 characters per wordpiece here: most contexts 100-250 tokens, ~8% a long tail beyond 384
    # so that several windows and answers past the first window occur.
    if rng.random() < 0.08:
        return int(rng.uniform(420, 700) * 4.3)
    return int(min(max(rng.gauss(165, 40), 90), 250) * 4.3)


def _paragraph(rng: random.Random, split: str, seed: int, first_qid: int) -> dict[str, Any]:
    entities = []
    while len(entities) < rng.randint(2, 4):
        ent = rng.choice(_PLACE_WORDS) + _name(rng, rng.choice([2, 2, 3]))
        if ent not in entities:
            entities.append(ent)
    # Each place gets its own attributes, mostly not repeated within the context, so an answerable question
    # is found by matching its attribute; now and then two places share one ("the mayor of A" next to "the
    # mayor of B"), so the place named in the question matters too.
    facts: dict[tuple[str, str], str] = {}
    pool = rng.sample(list(_ATTRIBUTES), len(_ATTRIBUTES))
    for ent in entities:
        for _ in range(rng.randint(1, 2)):
            attr = pool.pop() if pool and rng.random() > 0.1 else rng.choice(list(_ATTRIBUTES))
            facts.setdefault((ent, attr), _value(rng, attr))
    sentences: list[tuple[str, Any]] = []
    for (ent, attr), val in facts.items():
        sentences.append((rng.choice(_FACTS), (ent, attr, val)))
    target = _target_chars(rng)
    length = sum(len(t) + 30 for t, _ in sentences)
    while length < target:
        t = rng.choice(_FILLER)
        sentences.append((t, None))
        length += len(t) + 10
    rng.shuffle(sentences)

    context, where = "", {}
    for template, fact in sentences:
        if context:
            context += " "
        if fact is None:
            ent = rng.choice(entities)
            context += template.format(ent=ent, other=rng.choice([e for e in entities if e != ent]),
                                       adj=rng.choice(_ADJ))
            continue
        ent, attr, val = fact
        head, tail = template.split("{val}")
        context += head.format(attr=attr, ent=ent, art=_ATTRIBUTES[attr][0])
        where[(ent, attr)] = len(context)
        context += val + tail

    def span(text: str, start: int) -> dict[str, Any]:
        return {"text": text, "answer_start": start}

    qas = []
    used: set[tuple[str, str]] = set()
    for k in range(rng.randint(3, 6)):
        ent, attr, answers, plausible = None, None, [], []
        roll = rng.random()
        stated = [key for key in facts if key not in used]
        if roll < 0.5 and stated:
            ent, attr = rng.choice(stated)
            val, start = facts[(ent, attr)], where[(ent, attr)]
            # Dev files carry several annotations per answerable question, as SQuAD's dev set does.
            answers = [span(val, start)] * (rng.randint(1, 3) if split == "dev" else 1)
            if split == "dev" and " " in val and rng.random() < 0.3:
                last = val.rsplit(" ", 1)[1]
                answers.append(span(last, start + len(val) - len(last)))
        elif roll < 0.64:
            # Plausible: the attribute is stated in this context, but for another place.
            candidates = [(e, a) for e in entities for (o, a) in facts if o != e and (e, a) not in facts]
            if not candidates:
                continue
            ent, attr = rng.choice(candidates)
            owner = next(o for (o, a) in facts if a == attr)
            plausible = [span(facts[(owner, attr)], where[(owner, attr)])]
        elif roll < 0.72:
            # A place that is not in the context at all, asked about an attribute that is.
            ent = _name(rng, rng.choice([2, 3]))
            owner, attr = rng.choice(list(facts))
            plausible = [span(facts[(owner, attr)], where[(owner, attr)])]
        else:
            # A place in the context, asked about an attribute no place here has.
            unstated = [a for a in _ATTRIBUTES if all(a != b for (_, b) in facts)]
            if not unstated:
                continue
            ent, attr = rng.choice(entities), rng.choice(unstated)
        if (ent, attr) in used:
            continue
        used.add((ent, attr))
        qa: dict[str, Any] = {
            "id": _qid(split, seed, first_qid + len(qas)),
            "question": rng.choice(_QUESTIONS).format(attr=attr, ent=ent),
            "answers": answers,
            "is_impossible": not answers,
        }
        if plausible:
            qa["plausible_answers"] = plausible
        qas.append(qa)
    return {"context": context, "qas": qas, "_title": entities[0]}


def make_squad(n_questions: int, seed: int, *, split: str = "train") -> dict[str, Any]:
    """`n_questions` generated questions in the official SQuAD v2.0 JSON format; same seed, same file.

    `split` selects an independent random stream (and id space), so a dev set is not a copy of train.
    """
    rng = random.Random(f"hpml-squad/{split}/{seed}")
    articles: list[dict[str, Any]] = []
    count = 0
    while count < n_questions:
        para = _paragraph(rng, split, seed, count)
        para["qas"] = para["qas"][: n_questions - count]
        if not para["qas"]:
            continue
        count += len(para["qas"])
        title = para.pop("_title")
        # A few paragraphs per article, as in SQuAD, where an article has several paragraphs.
        if articles and len(articles[-1]["paragraphs"]) < 3 and rng.random() < 0.6:
            articles[-1]["paragraphs"].append(para)
        else:
            articles.append({"title": title, "paragraphs": [para]})
    return {"version": "v2.0", "data": articles}


def write_squad(out_dir: str, n_train: int, n_dev: int, seed: int) -> tuple[str, str]:
    """Write out_dir/train-v2.0.json and out_dir/dev-v2.0.json; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, n, name in (("train", n_train, "train-v2.0.json"), ("dev", n_dev, "dev-v2.0.json")):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(make_squad(n, seed, split=split), f)
        paths.append(path)
    return paths[0], paths[1]


# ---- SST-2 -----------------------------------------------------------------------------------------------
_POS = ["charming", "funny", "moving", "smart", "gorgeous", "gripping", "warm", "clever", "touching",
        "delightful", "sharp", "beautiful", "thoughtful", "wonderful", "engaging", "fresh"]
_NEG = ["dull", "boring", "clumsy", "tedious", "shallow", "bland", "predictable", "messy", "lifeless",
        "tiresome", "awful", "flat", "pointless", "sloppy", "forgettable", "stale"]
_NOUNS = ["film", "movie", "picture", "story", "script", "cast", "comedy", "drama", "thriller", "performance",
          "direction", "soundtrack", "ending", "debut"]
_INTENSIFIERS = ["", "", "very ", "really ", "quite ", "remarkably ", "often ", "surprisingly "]
_NEGATIONS = ["not ", "never ", "hardly ", "not at all "]


def _clause(rng: random.Random, positive: bool) -> str:
    """A clause whose sentiment is `positive`; a third of them reach it through a negated opposite word."""
    negate = rng.random() < 0.33
    word = rng.choice(_NEG if positive == negate else _POS)
    noun = rng.choice(_NOUNS)
    if negate:
        pattern = rng.choice([
            "the {noun} is {neg}{word}",
            "it 's {neg}{word}",
            "this {noun} is {neg}{word} , not for a moment",
            "the {noun} does n't feel {word}",
        ])
    else:
        pattern = rng.choice([
            "the {noun} is {int}{word}",
            "{a} {int}{word} {noun}",
            "it 's {a} {int}{word} and {word2} {noun}",
            "what {a} {int}{word} {noun}",
            "the {noun} feels {int}{word}",
        ])
    word2 = rng.choice(_NEG if positive == negate else _POS)
    intensifier = rng.choice(_INTENSIFIERS)
    article = "an" if (intensifier or word)[0] in "aeiou" else "a"
    return pattern.format(noun=noun, neg=rng.choice(_NEGATIONS), word=word, word2=word2, int=intensifier,
                          a=article)


def make_sst2(n: int, seed: int, *, split: str = "train") -> list[tuple[str, int]]:
    """`n` (sentence, label) pairs like GLUE SST-2: lower-case, tokenized, label 1 = positive, balanced.

    `split` selects an independent random stream, so a dev set is not a copy of train.
    """
    rng = random.Random(f"hpml-sst2/{split}/{seed}")
    rows = []
    for i in range(n):
        label = i % 2  # exactly balanced before the shuffle below
        if rng.random() < 0.3:
            # Contrast: the clause after "but" decides, so the first clause's words mislead.
            sentence = f"{_clause(rng, not label)} , but {_clause(rng, bool(label))} ."
        else:
            sentence = f"{_clause(rng, bool(label))} ."
        rows.append((sentence, label))
    rng.shuffle(rows)
    return rows


def write_sst2(out_dir: str, n_train: int, n_dev: int, seed: int) -> tuple[str, str]:
    """Write GLUE-format out_dir/train.tsv and out_dir/dev.tsv (header sentence<TAB>label)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, n, name in (("train", n_train, "train.tsv"), ("dev", n_dev, "dev.tsv")):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            # Generated sentences hold no tab or newline, so plain lines are valid TSV without quoting.
            f.write("sentence\tlabel\n")
            f.writelines(f"{sentence}\t{label}\n" for sentence, label in make_sst2(n, seed, split=split))
        paths.append(path)
    return paths[0], paths[1]


# ---- MNLI-format pairs -----------------------------------------------------------------------------------
_COLORS = ["red", "blue", "green", "white", "black", "yellow", "brown", "grey"]
_THINGS = ["car", "house", "boat", "door", "chair", "kite", "lamp", "bicycle", "fence", "tent"]
_PLACES = ["near the river", "in the garden", "on the hill", "by the road", "in the square", "at the port"]
_SIZES = ["large", "small", "old", "new", "heavy", "cheap"]


def make_mnli(n: int, seed: int, *, split: str = "train") -> list[tuple[str, str, str]]:
    """`n` (premise, hypothesis, gold label) triples, labels balanced: the hypothesis restates the premise
    (entailment), negates or recolours it (contradiction), or adds an unmentioned attribute (neutral)."""
    rng = random.Random(f"hpml-mnli/{split}/{seed}")
    rows = []
    for i in range(n):
        label = ("entailment", "neutral", "contradiction")[i % 3]
        thing, color, place = rng.choice(_THINGS), rng.choice(_COLORS), rng.choice(_PLACES)
        premise = f"the {color} {thing} stands {place} ."
        if label == "entailment":
            hypothesis = rng.choice([f"the {thing} is {color} .", f"there is a {thing} {place} ."])
        elif label == "contradiction":
            other = rng.choice([c for c in _COLORS if c != color])
            hypothesis = rng.choice([f"the {thing} is not {color} .", f"the {thing} is {other} ."])
        else:
            hypothesis = f"the {thing} is {rng.choice(_SIZES)} ."
        rows.append((premise, hypothesis, label))
    rng.shuffle(rows)
    return rows


def write_mnli(out_dir: str, n_train: int, n_dev: int, seed: int) -> tuple[str, str]:
    """Write out_dir/train.tsv and out_dir/dev_matched.tsv with GLUE MNLI's sentence1/sentence2/gold_label."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, n, name in (("train", n_train, "train.tsv"), ("dev", n_dev, "dev_matched.tsv")):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("sentence1\tsentence2\tgold_label\n")
            f.writelines(f"{p}\t{h}\t{label}\n" for p, h, label in make_mnli(n, seed, split=split))
        paths.append(path)
    return paths[0], paths[1]
