"""Generate the 911-call triage dataset: hand-written templates x slot values, fixed seed.

    python data/make_triage.py                 # rewrites data/triage_train.jsonl and data/triage_dev.jsonl

Every template below was written for this project and carries its gold labels
(priority, category) and a reference summary with the same slots.  The labelling
rules (data/README.md) decide the ambiguous ones: the gold label is what a
dispatcher following those rules would enter, not what the caller claims.

Each row: ``{"id", "transcript", "priority", "category", "summary", "template"}``.
The ``template`` id lets a reader check how varied a split is; programs never see it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

SEED = 20261124
TRAIN_SIZE = 300
DEV_SIZE = 100

SLOTS: dict[str, list[str]] = {
    "addr": [
        "14 Birch Lane", "221 Maple Avenue", "the corner of 5th and Main", "Riverside Apartments, unit 3B",
        "870 Old Mill Road", "42 Harbor View Drive", "the end of Cedar Court", "1190 Lincoln Boulevard, apartment 12",
        "3 Willow Way", "the duplex at 58 Garfield Street", "Pinecrest Trailer Park, lot 17", "605 Elm Street",
    ],
    "place": [
        "the Safeway parking lot", "the gas station on Route 9", "Lincoln Elementary", "the bus stop on Grant Street",
        "the Riverside mall food court", "the laundromat on 3rd Avenue", "Memorial Park by the fountain",
        "the Walgreens on Fremont", "the train platform at Central Station", "the library on Oak Street",
        "the skate park behind the rec center", "the Motel 6 off the highway",
    ],
    "person": [
        "an older man", "a teenage girl", "my husband", "my neighbor", "a woman in her thirties", "my dad",
        "a little boy, maybe six", "my roommate", "a guy who works here", "my grandmother",
    ],
    "suspect": [
        "a tall guy in a red hoodie", "two men in ski masks", "a woman with a blond ponytail and a green jacket",
        "a skinny kid on a bike", "a heavyset man with a beard", "someone in all black", "three teenagers",
    ],
    "vehicle": [
        "a silver sedan", "a white pickup truck", "a black SUV", "a blue minivan", "a red hatchback",
        "a motorcycle", "a delivery van",
    ],
    "when": ["just now", "a minute ago", "about ten minutes ago", "right now", "like thirty seconds ago"],
    "past": ["last night", "yesterday afternoon", "over the weekend", "sometime this morning", "two days ago"],
    "dog": ["pit bull", "German shepherd", "big brown dog", "husky", "small white dog", "black lab"],
}

# (template id, priority, category, transcript, reference summary)
TEMPLATES: list[tuple[str, str, str, str, str]] = [
    # -- fire ---------------------------------------------------------------------------------
    ("fire-kitchen", "urgent", "fire",
     "My kitchen is full of smoke and the stove is on fire, I can't put it out. I'm at {addr}.",
     "Kitchen stove fire at {addr}; caller cannot extinguish it."),
    ("fire-house-trapped", "urgent", "fire",
     "The house across the street at {addr} is on fire and I think {person} is still inside!",
     "Structure fire at {addr}; {person} may be trapped inside."),
    ("fire-car", "urgent", "fire",
     "There's {vehicle} on fire at {place}, flames are coming out from under the hood and people are standing close.",
     "Vehicle fire ({vehicle}) at {place}; bystanders nearby."),
    ("fire-brush", "urgent", "fire",
     "There's a brush fire spreading up the hill behind {addr}, the wind is pushing it toward the houses.",
     "Brush fire behind {addr} spreading toward homes."),
    ("fire-smell-smoke", "non_urgent", "fire",
     "I smell something like burning plastic in my apartment at {addr} but I can't find any smoke or fire.",
     "Burning-plastic smell at {addr}; no visible smoke or fire."),
    ("fire-gas-smell", "urgent", "fire",
     "It smells really strongly of gas in the hallway at {addr}, my eyes are watering.",
     "Strong gas odor in the hallway at {addr}."),
    ("fire-co-alarm", "urgent", "fire",
     "Our carbon monoxide alarm keeps going off at {addr} and {person} says they feel dizzy.",
     "CO alarm sounding at {addr}; {person} feels dizzy."),
    ("fire-alarm-chirp", "not_an_emergency", "other",
     "My smoke detector keeps chirping every minute, there's no smoke, how do I make it stop?",
     "Smoke detector chirping (low battery); no smoke or fire."),
    ("fire-controlled-burn", "non_urgent", "fire",
     "My neighbor at {addr} is burning a big pile of leaves in his yard and the smoke is blowing into my windows.",
     "Neighbor burning leaves at {addr}; smoke blowing into caller's home."),
    ("fire-wire-down", "urgent", "fire",
     "A power line came down across the road in front of {addr} and it's sparking on the wet grass.",
     "Downed sparking power line in front of {addr}."),
    ("fire-dumpster", "non_urgent", "fire",
     "The dumpster behind {place} is smoldering, there's a little smoke but nothing near it.",
     "Smoldering dumpster behind {place}; nothing nearby at risk."),
    # -- medical ------------------------------------------------------------------------------
    ("med-not-breathing", "urgent", "medical",
     "There's {person} lying on the ground at {place}, not breathing!",
     "{person} unresponsive and not breathing at {place}."),
    ("med-heart", "urgent", "medical",
     "I think I'm having a heart attack, my chest is crushing and my left arm is numb. I'm at {addr}.",
     "Caller at {addr} with chest pain and left arm numbness, possible heart attack."),
    ("med-seizure", "urgent", "medical",
     "{person} is having a seizure on the floor at {place}, it's been going for like three minutes.",
     "{person} seizing for about three minutes at {place}."),
    ("med-overdose", "urgent", "medical",
     "My roommate took a bunch of pills and now I can't wake him up, we're at {addr}.",
     "Possible overdose at {addr}; roommate unresponsive."),
    ("med-allergy", "urgent", "medical",
     "{person} ate something with peanuts and their throat is swelling up, we're at {place}.",
     "{person} with throat swelling after peanut exposure at {place}, possible anaphylaxis."),
    ("med-fall-hip", "non_urgent", "medical",
     "{person} fell in the bathroom at {addr} and might have hurt a hip, awake and talking but can't get up.",
     "{person} fell at {addr}, possible hip injury; conscious and talking."),
    ("med-cut", "non_urgent", "medical",
     "I cut my hand pretty badly chopping onions, it's bleeding but I've got a towel on it and it's slowing down. {addr}.",
     "Hand laceration at {addr}; bleeding controlled with a towel."),
    ("med-fever-child", "non_urgent", "medical",
     "My son has had a fever of 103 since {past} and he's really tired, should someone come look at him? We're at {addr}.",
     "Child with 103F fever since {past} at {addr}; lethargic."),
    ("med-pharmacy-question", "not_an_emergency", "medical",
     "I forgot whether I already took my blood pressure pill this morning, is it okay to take another one?",
     "Medication question about a possibly missed blood pressure dose; no emergency."),
    ("med-diabetic", "urgent", "medical",
     "My dad is diabetic and he's confused and sweaty and not making sense, we're at {addr}.",
     "Diabetic male confused and sweating at {addr}, possible low blood sugar."),
    ("med-crash-injured", "urgent", "medical",
     "Two cars just crashed at {place}, one driver is bleeding from the head and not moving.",
     "Two-car crash at {place}; one driver with head bleeding, unresponsive."),
    ("med-drunk-sleeping", "non_urgent", "medical",
     "There's {person} passed out on the bench at {place}, snoring and smelling like alcohol.",
     "Intoxicated person asleep on a bench at {place}; breathing."),
    ("med-pregnant", "urgent", "medical",
     "My wife is in labor and the baby is coming right now, I can see the head! We're at {addr}.",
     "Imminent childbirth at {addr}; baby's head visible."),
    # -- crime --------------------------------------------------------------------------------
    ("crime-car-break", "non_urgent", "crime",
     "Someone smashed my car window at {place} and took my laptop bag {when}. It was {suspect}, they ran off.",
     "Vehicle break-in at {place}; laptop bag stolen by {suspect}, who fled."),
    ("crime-burglary-past", "non_urgent", "crime",
     "I came home and my back door was kicked in, my TV and jewelry are gone. It happened {past}, I'm at {addr}.",
     "Burglary discovered at {addr}; TV and jewelry taken {past}."),
    ("crime-burglary-now", "urgent", "crime",
     "Someone is breaking into my house right now, I can hear them downstairs. I'm hiding in the closet at {addr}.",
     "Burglary in progress at {addr}; caller hiding inside."),
    ("crime-gun", "urgent", "crime",
     "There's {suspect} waving a gun around at {place}, everybody is running!",
     "Armed person ({suspect}) with a gun at {place}; people fleeing."),
    ("crime-domestic", "urgent", "crime",
     "My boyfriend is hitting me and he said he'll kill me, he's in the other room now. {addr}.",
     "Domestic assault in progress at {addr}; threats to kill."),
    ("crime-shoplift", "non_urgent", "crime",
     "I'm the manager at {place}, {suspect} just walked out with a cart full of stuff without paying.",
     "Shoplifting at {place} by {suspect}, who left with unpaid goods."),
    ("crime-fight", "urgent", "crime",
     "There's a fist fight outside {place}, like five guys, one of them pulled out a knife.",
     "Group fight outside {place}; one person has a knife."),
    ("crime-suspicious-car", "non_urgent", "crime",
     "There's {vehicle} that's been parked on our street for three hours with someone sitting in it, watching the houses near {addr}.",
     "Suspicious occupied {vehicle} parked for hours near {addr}."),
    ("crime-graffiti", "not_an_emergency", "crime",
     "Somebody spray painted graffiti on our fence {past}. I just need a report number for insurance.",
     "Graffiti on fence from {past}; caller wants a report number."),
    ("crime-stolen-bike", "not_an_emergency", "crime",
     "My bike got stolen from outside {place} {past}, I don't know who took it, can I file a report?",
     "Bike stolen from {place} {past}; no suspect, report requested."),
    ("crime-scam-call", "not_an_emergency", "crime",
     "I got a call saying I owe the IRS money and have to pay with gift cards. I didn't pay, I just want to report it.",
     "IRS gift-card scam call reported; caller did not pay."),
    ("crime-drunk-driver", "urgent", "crime",
     "I'm behind {vehicle} on the highway near {place} that's swerving all over the lanes, almost hit the guardrail twice.",
     "Possible impaired driver in {vehicle} swerving on the highway near {place}."),
    ("crime-hit-run-noinjury", "non_urgent", "crime",
     "Somebody just backed into my parked car at {place} and drove off, it was {vehicle}. Nobody's hurt.",
     "Hit-and-run on parked car at {place} by {vehicle}; no injuries."),
    ("crime-trespass", "non_urgent", "crime",
     "There's {suspect} sleeping in the stairwell of our building at {addr} and shouldn't be here.",
     "Trespasser ({suspect}) sleeping in stairwell at {addr}."),
    ("other-child-missing", "urgent", "other",
     "I can't find my daughter, she's five, she was right next to me at {place} {when}!",
     "Five-year-old girl missing at {place}, last seen {when}."),
    # -- animal -------------------------------------------------------------------------------
    ("animal-attack", "urgent", "animal",
     "A {dog} is attacking {person} at {place}, there's blood everywhere!",
     "{dog} attacking {person} at {place}; bleeding."),
    ("animal-loose-dog", "non_urgent", "animal",
     "There's a {dog} running loose around {place}, it's not aggressive but it's close to the road.",
     "Loose {dog} near the road at {place}; not aggressive."),
    ("animal-lost-cat", "not_an_emergency", "animal",
     "My cat got out {past} and hasn't come back, who do I call to report a lost pet?",
     "Lost cat since {past}; caller asking where to report it."),
    ("animal-raccoon", "non_urgent", "animal",
     "There's a raccoon stumbling around in broad daylight at {place}, it's acting really strange near the kids.",
     "Raccoon acting sick in daylight at {place} near children."),
    ("animal-deer-road", "non_urgent", "animal",
     "I hit a deer near {addr}, it's lying in the lane still alive. I'm okay and my car is off the road.",
     "Injured deer in the lane near {addr} after a collision; caller unhurt."),
    ("animal-dog-hot-car", "urgent", "animal",
     "There's a dog locked in {vehicle} at {place}, windows up, it's 95 degrees and the dog is panting and collapsing.",
     "Dog collapsing in a locked hot {vehicle} at {place}."),
    ("animal-snake", "non_urgent", "animal",
     "There's a big snake in my garage at {addr}, I don't know if it's poisonous, nobody's been bitten.",
     "Snake in garage at {addr}; species unknown, no bites."),
    ("animal-barking", "non_urgent", "noise",
     "My neighbor's {dog} has been barking nonstop for three hours, I live at {addr}.",
     "Continuous dog barking for three hours near {addr}."),
    ("animal-cat-tree", "not_an_emergency", "animal",
     "My cat has been stuck up the tree in our yard since {past}, she's meowing but seems fine.",
     "Cat stuck in a tree since {past}; appears unhurt."),
    # -- noise --------------------------------------------------------------------------------
    ("noise-party", "non_urgent", "noise",
     "The people at {addr} are having a party with music blasting and it's two in the morning.",
     "Loud party with music at {addr} at 2 a.m."),
    ("noise-construction", "non_urgent", "noise",
     "They're jackhammering at the construction site next to {addr} and it's eleven at night.",
     "Late-night construction noise next to {addr}."),
    ("noise-car-alarm", "non_urgent", "noise",
     "A car alarm on {vehicle} outside {addr} has been going off for over an hour.",
     "Car alarm sounding over an hour outside {addr}."),
    ("noise-yelling-unclear", "non_urgent", "noise",
     "I hear yelling through the wall at {addr}, I can't tell if they're just arguing loudly or something worse.",
     "Loud yelling heard through the wall at {addr}; unclear if violent."),
    ("noise-screaming-help", "urgent", "crime",
     "I just heard a woman screaming 'help, stop' in the apartment above me at {addr}, then a loud thud.",
     "Woman screaming for help and a thud in the apartment above {addr}."),
    ("noise-fireworks", "non_urgent", "noise",
     "Kids are setting off fireworks in the street by {addr}, it's been going on for an hour.",
     "Fireworks set off in the street near {addr} for an hour."),
    ("noise-gunshot-maybe", "urgent", "crime",
     "I heard what sounded like three gunshots near {place} {when}, could have been fireworks but it was really sharp.",
     "Possible gunshots (three) near {place} {when}."),
    ("noise-music-car", "non_urgent", "noise",
     "Someone in {vehicle} has been sitting outside {addr} blasting bass for forty minutes.",
     "Loud car stereo from {vehicle} outside {addr} for forty minutes."),
    # -- other --------------------------------------------------------------------------------
    ("other-pocket-dial", "not_an_emergency", "other",
     "Oh, sorry, I didn't mean to call, my phone dialed by itself in my pocket. Everything's fine.",
     "Accidental pocket dial; caller confirms no emergency."),
    ("other-info-dmv", "not_an_emergency", "other",
     "Hi, do you know what time the DMV opens tomorrow?",
     "Information request (DMV hours); no emergency."),
    ("other-power-out", "not_an_emergency", "other",
     "Our power has been out at {addr} since {past}, when is it coming back?",
     "Power outage at {addr} since {past}; caller asking about restoration."),
    ("other-pothole", "not_an_emergency", "other",
     "There's a huge pothole on the road by {addr}, who do I report that to?",
     "Pothole report near {addr}; caller asking who handles it."),
    ("other-welfare", "non_urgent", "other",
     "I haven't heard from {person} in three days and nobody answers the phone, can someone check at {addr}?",
     "Welfare check requested for {person} at {addr}; no contact for three days."),
    ("other-crash-noinjury", "non_urgent", "other",
     "I was in a small fender bender at {place}, nobody's hurt but the other driver won't give me his insurance.",
     "Minor collision at {place}, no injuries; dispute over insurance information."),
    ("other-tree-road", "non_urgent", "other",
     "A big tree branch fell and is blocking half the road in front of {addr}, no wires involved.",
     "Fallen branch blocking half the road at {addr}; no wires."),
    ("other-flooding", "non_urgent", "other",
     "The street in front of {addr} is flooding from a broken water main, water's coming up over the curb.",
     "Broken water main flooding the street at {addr}."),
    ("other-lockout", "not_an_emergency", "other",
     "I locked my keys in my car at {place}, nobody's inside it, can you send someone to open it?",
     "Keys locked in an empty car at {place}."),
    ("other-child-locked-car", "urgent", "other",
     "My baby is locked in my car at {place} and the keys are inside, it's getting really hot!",
     "Infant locked inside a hot car at {place}."),
    ("other-test-call", "not_an_emergency", "other",
     "Hi, I'm just testing if 911 works on my new phone. Sorry about that.",
     "Test call from a new phone; no emergency."),
    ("other-elevator", "non_urgent", "other",
     "I'm stuck in the elevator at {place} with two other people, we're all okay but it's been twenty minutes.",
     "Three people stuck in an elevator at {place} for twenty minutes; all okay."),
    ("other-prank-kid", "not_an_emergency", "other",
     "Hehe, is this the police? My friend says you have donuts. Bye!",
     "Prank call from a child; no emergency."),
    ("other-road-debris", "non_urgent", "other",
     "There's a mattress in the middle lane of the freeway near {place}, cars are swerving around it.",
     "Mattress in the freeway's middle lane near {place}; cars swerving."),
]

OPENERS = ["", "", "", "Hi, ", "Hello? ", "Yes, hi, ", "Um, ", "Please, ", "Okay so, ", "911? Yes. "]
CLOSERS = ["", "", "", " Please hurry.", " I don't know what to do.", " Sorry if this is the wrong number.",
           " My number is 555-0142.", " Can you send someone?"]


def _fill(template: str, values: dict[str, str]) -> str:
    return template.format(**values)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_rows(seed: int = SEED, total: int = TRAIN_SIZE + DEV_SIZE) -> list[dict[str, str]]:
    """``total`` distinct calls, cycling through the templates so each appears about equally often."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    order = list(TEMPLATES)
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > total * 50:
            raise RuntimeError("not enough distinct calls from these templates and slots")
        if not order:
            order = list(TEMPLATES)
        rng.shuffle(order)
        tid, priority, category, text, summary = order.pop()
        values = {name: rng.choice(options) for name, options in SLOTS.items()}
        opener, body = rng.choice(OPENERS), _fill(text, values)
        body = body[:1].lower() + body[1:] if opener and not body.startswith("I ") else _capitalize(body)
        transcript = opener + body + rng.choice(CLOSERS)
        if rng.random() < 0.15:  # some callers do not punctuate or capitalise
            transcript = transcript.lower().replace(",", "")
        if transcript in seen:
            continue
        seen.add(transcript)
        rows.append({
            "id": "call-" + hashlib.sha1(transcript.encode()).hexdigest()[:10],
            "transcript": transcript,
            "priority": priority,
            "category": category,
            # The summary is the dispatcher's, so the caller's "my neighbor" becomes "caller's neighbor".
            "summary": _capitalize(_fill(summary, {k: v.replace("my ", "caller's ") for k, v in values.items()})),
            "template": tid,
        })
    return rows


def split(rows: list[dict[str, str]], dev_size: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    shuffled = list(rows)
    random.Random(seed + 1).shuffle(shuffled)
    return shuffled[dev_size:], shuffled[:dev_size]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate data/triage_{train,dev}.jsonl from the templates.")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--dev-size", type=int, default=DEV_SIZE)
    args = parser.parse_args(argv)
    rows = make_rows(args.seed, args.train_size + args.dev_size)
    train, dev = split(rows, args.dev_size, args.seed)
    out = Path(args.out_dir)
    write_jsonl(out / "triage_train.jsonl", train)
    write_jsonl(out / "triage_dev.jsonl", dev)
    for name, part in (("train", train), ("dev", dev)):
        pri = Counter(r["priority"] for r in part)
        cat = Counter(r["category"] for r in part)
        print(f"{name}: {len(part)} calls, {len({r['template'] for r in part})} templates; "
              f"priority {dict(sorted(pri.items()))}; category {dict(sorted(cat.items()))}")


if __name__ == "__main__":
    main()
