"""A personal-token identification benchmark with ground truth (seeded, offline).

Each synthetic persona has attributes (home city, diet, job, pet + its name, hobby) and
writing habits (a sign-off, a favourite emoji, an exclamation habit, all-lowercase).
Its profile is a few ``email``-task items (``title``, ``text``): first-person posts,
notes and bios that state every attribute and show every habit. Each record asks for a
message (``input``: an instruction plus ``Subject: ...``) and its ``output`` mixes
generic sentences with sentences about the persona. Every character span of the output
that depends on the persona is labelled::

    "spans": [{"start": int, "end": int, "kind": "copied"|"implied"|"style", "attribute": str}]

* ``copied``: the words appear in the profile ("Lisbon", "vegetarian", the pet's name).
* ``implied``: they follow from the profile but none of their words is in it
  (Lisbon -> "Tagus", vegetarian -> "lentil curry", dog -> "leash").
* ``style``: a habit of the user's writing (sign-off, emoji, "!!" endings, and in an
  all-lowercase persona every word that would otherwise be capitalized).

Everything else is generic. Variety (30 cities, 8 diets, 16 jobs, 8 pets, 16 hobbies,
several templates per slot, shuffled sentence order, generic distractor sentences that
also appear in profiles) keeps a model from predicting a personal word from the template
alone. Splits are by persona: no persona has records in two splits. Same seed, same
bytes (``random.Random`` seeded with strings, no set iteration).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..files import write_jsonl_atomic, write_text_atomic

KINDS = ("copied", "implied", "style")
ATTRIBUTES = ("city", "diet", "job", "pet", "hobby")
SPLITS = ("train", "val", "test")  # the split names of every prepared dataset (was train/dev/test)

# Values may hold "|": the text before it is generic glue ("the "), the rest is the span.
CITIES: dict[str, tuple[str, ...]] = {
    "Lisbon": ("the |Tagus", "|Alfama", "|Belém Tower"),
    "Paris": ("the |Seine", "|Montmartre", "the |Marais"),
    "London": ("the |Thames", "|Camden", "|Hampstead Heath"),
    "Berlin": ("the |Spree", "|Kreuzberg", "|Tempelhof"),
    "Rome": ("the |Tiber", "|Trastevere", "the |Colosseum"),
    "Tokyo": ("|Shibuya", "|Shinjuku", "the |Sumida"),
    "New York": ("the |Hudson", "|Brooklyn", "|Central Park"),
    "Barcelona": ("the |Ramblas", "|Barceloneta", "|Montjuïc"),
    "Amsterdam": ("the |Jordaan", "|Vondelpark", "the |Amstel"),
    "Vienna": ("the |Prater", "the |Naschmarkt", "|Schönbrunn"),
    "Prague": ("the |Vltava", "|Charles Bridge", "|Vinohrady"),
    "Budapest": ("the |Danube", "|Margaret Island", "the |Széchenyi baths"),
    "Istanbul": ("the |Bosphorus", "|Galata", "|Kadıköy"),
    "Sydney": ("|Bondi", "the |Harbour Bridge", "|Manly"),
    "Chicago": ("|Lake Michigan", "|Wrigleyville", "the |Loop"),
    "San Francisco": ("the |Golden Gate", "the |Mission", "|Ocean Beach"),
    "Seattle": ("|Puget Sound", "|Fremont", "|Capitol Hill"),
    "Mexico City": ("|Coyoacán", "|Chapultepec", "the |Zócalo"),
    "Buenos Aires": ("|Palermo", "|Recoleta", "|San Telmo"),
    "Cairo": ("the |Nile", "|Zamalek", "|Khan el-Khalili"),
    "Edinburgh": ("|Arthur's Seat", "the |Royal Mile", "|Leith"),
    "Dublin": ("the |Liffey", "|Temple Bar", "|Howth"),
    "Copenhagen": ("|Nyhavn", "|Tivoli", "|Nørrebro"),
    "Stockholm": ("|Gamla Stan", "|Djurgården", "|Södermalm"),
    "Seoul": ("the |Han River", "|Gangnam", "|Bukchon"),
    "Mumbai": ("|Marine Drive", "|Bandra", "|Juhu"),
    "Montreal": ("|Mont Royal", "the |Plateau", "|Jean-Talon"),
    "Vancouver": ("|Stanley Park", "|Granville Island", "|Kitsilano"),
    "Cape Town": ("|Table Mountain", "|Bo-Kaap", "|Muizenberg"),
    "Kyoto": ("|Gion", "|Arashiyama", "the |Kamo"),
}
DIETS: dict[str, tuple[str, ...]] = {
    "vegetarian": ("|lentil curry", "|halloumi", "|falafel"),
    "vegan": ("|tofu", "|tempeh", "|cashew cheese"),
    "pescatarian": ("|grilled sardines", "|salmon", "|prawns"),
    "gluten-free": ("|rice noodles", "|quinoa", "|corn tortillas"),
    "keto": ("|cauliflower rice", "|pork rinds", "|avocados"),
    "dairy-free": ("|almond milk", "|coconut yogurt", "|oat cream"),
    "paleo": ("|sweet potatoes", "|steak", "|bone broth"),
    "flexitarian": ("|bean chili", "|mushroom risotto", "|veggie burgers"),
}
JOBS: dict[str, tuple[str, ...]] = {
    "nurse": ("the |ward rounds", "the |patient handover", "my |scrubs laundry"),
    "teacher": ("the |grading", "the |report cards", "the |parents evening"),
    "software developer": ("the |code review", "a |merge conflict", "the |deploy"),
    "chef": ("the |brigade", "the |prep list", "the |walk-in fridge"),
    "architect": ("the |blueprints", "a |site inspection", "the |planning permit"),
    "pilot": ("a |layover", "the |preflight checks", "the |simulator session"),
    "lawyer": ("a |court hearing", "the |deposition", "the |case files"),
    "journalist": ("a |deadline", "the |editor", "the |interview transcript"),
    "pharmacist": ("the |prescriptions", "the |dispensary", "the |flu jabs"),
    "electrician": ("the |rewiring", "a |fuse box", "the |circuit breaker"),
    "dentist": ("the |fillings", "a |root canal", "the |hygienist"),
    "accountant": ("the |tax returns", "the |audit", "the |ledger"),
    "librarian": ("the |cataloguing", "the |overdue notices", "the |returns trolley"),
    "mechanic": ("a |gearbox", "the |oil changes", "the |brake pads"),
    "firefighter": ("the |station drills", "a |call-out", "the |hose checks"),
    "farmer": ("the |harvest", "the |tractor", "the |lambing"),
}
PETS: dict[str, tuple[str, ...]] = {
    "dog": ("a new |leash", "more |kibble", "a |chew toy"),
    "cat": ("more |catnip", "a new |scratching post", "|litter"),
    "rabbit": ("fresh |hay", "a bigger |hutch", "|dandelions"),
    "parrot": ("a new |perch", "|birdseed", "a |cuttlebone"),
    "hamster": ("a new |exercise wheel", "|sawdust", "|sunflower seeds"),
    "horse": ("a new |bridle", "|hoof oil", "|saddle soap"),
    "tortoise": ("a |heat lamp", "|cuttlefish", "|calcium powder"),
    "goldfish": ("an |aquarium filter", "|fish flakes", "|pondweed"),
}
PET_NAMES = ("Biscuit", "Pepper", "Mochi", "Luna", "Ziggy", "Olive", "Bruno", "Noodle", "Pickles", "Juniper",
             "Waffles", "Ginger", "Otis", "Maple", "Quokka", "Pudding", "Rocket", "Clementine", "Basil", "Nacho",
             "Pixel", "Marble", "Sprout", "Dumpling", "Captain", "Peanut", "Hazel", "Sprocket", "Kiwi", "Fig")
HOBBIES: dict[str, tuple[str, ...]] = {
    "cycling": ("my |helmet", "the |derailleur", "my |bike lights"),
    "climbing": ("my |chalk bag", "my |belay device", "the |crash pad"),
    "jogging": ("my |trainers", "my |heart-rate strap", "the |reflective vest"),
    "painting": ("my |watercolours", "a |canvas", "the |easel"),
    "chess": ("my |chessboard", "the |endgame puzzles", "the |blitz clock"),
    "gardening": ("my |trowel", "the |seedlings", "the |compost bin"),
    "photography": ("my |tripod", "the |wide-angle lens", "the |memory cards"),
    "knitting": ("my |yarn", "the |cable needles", "a |half-finished scarf"),
    "surfing": ("my |wetsuit", "the |surfboard", "the |board wax"),
    "birdwatching": ("my |binoculars", "the |field guide", "the |spotting scope"),
    "pottery": ("the |kiln", "my |clay", "the |glaze samples"),
    "swimming": ("my |goggles", "my |swim cap", "the |kickboard"),
    "hiking": ("my |trekking poles", "my |rucksack", "the |trail map"),
    "yoga": ("my |foam blocks", "the |bolster", "my |mat bag"),
    "skiing": ("my |lift pass", "the |ski boots", "the |salopettes"),
    "rowing": ("the |ergometer", "my |oars", "the |rowing gloves"),
}
FIRST_NAMES = ("Maria", "Tom", "Lena", "Raj", "Sam", "Aiko", "Bruno", "Chloe", "Dev", "Elif", "Farah", "Gus",
               "Hana", "Ivan", "Jade", "Kofi", "Lucia", "Milo", "Nadia", "Omar", "Priya", "Quinn", "Rosa",
               "Sven", "Tara", "Uma", "Viktor", "Wen", "Yara", "Zoe", "Alex", "Bea", "Carlos", "Dana", "Emil",
               "Freya", "Hugo", "Ines", "Jonas", "Kira")
SIGNOFFS = ("Cheers, {n}", "Best, {n}", "Talk soon, {n}", "xo {n}", "Warmly, {n}", "Take care, {n}",
            "Ciao, {n}", "Hugs, {n}", "Later, {n}", "— {n}", "Peace, {n}", "Love, {n}")
EMOJIS = ("🌿", "😊", "🙌", "🎉", "✨", "😄", "🌻", "🍀", "🔥", "🙂", "🌈", "💫")
EXCLAIMS = ("!!", "!!!")

# Response sentences; a trailing "?" keeps its mark, the others end in "." or the habit.
ATTR_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "city": {
        "copied": ("I'm back in {city} by Friday", "There's a new bakery opening in {city} this month",
                   "Everything in {city} is packed this week", "I've been showing a cousin around {city}",
                   "The weather in {city} has finally turned", "Have you ever been to {city}?"),
        "implied": ("We could meet near {city_i} afterwards", "I'll be around {city_i} in the afternoon",
                    "The light over {city_i} was lovely yesterday", "There's a nice spot by {city_i} we could try",
                    "I walked past {city_i} on my way home"),
    },
    "diet": {
        "copied": ("Since I'm {diet}, could we pick somewhere with options for me?",
                   "Just a reminder that I'm {diet} these days", "Being {diet} makes most menus tricky",
                   "I've been {diet} for years now, so no worries about me"),
        "implied": ("I'll bring some {diet_i} for everyone", "I made a big batch of {diet_i} last night",
                    "Could we get {diet_i} this time?", "I'm craving {diet_i} again"),
    },
    "job": {
        "copied": ("Work has been hectic, being {job_a} in December", "As {job_a}, I rarely get a proper break",
                   "Most people don't realise how tiring it is to be {job_a}",
                   "My manager finally approved some time off, which is rare for {job_a}"),
        "implied": ("I'm stuck with {job_i} until six", "{job_i} took most of the morning",
                    "I still have {job_i} to get through before Friday", "Sorry, {job_i} dragged on again"),
    },
    "pet": {
        "copied": ("{pet_name} says hi", "I need to get home early to feed {pet_name}",
                   "My {pet} has been extra needy this week", "I can't stay late because of {pet_name}",
                   "{pet_name} kept me up half the night"),
        "implied": ("I have to pick up {pet_i} on the way home", "I forgot to buy {pet_i} again",
                    "I finally ordered {pet_i} online", "Remind me to get {pet_i} tomorrow"),
    },
    "hobby": {
        "copied": ("I'm hoping to squeeze in some {hobby} on Sunday", "{hobby} has been my escape lately",
                   "I finally signed up for a {hobby} club", "Too tired for {hobby} this week, sadly"),
        "implied": ("I left {hobby_i} at a friend's place", "I need to replace {hobby_i} before the weekend",
                    "{hobby_i} finally arrived today", "I spent an hour sorting out {hobby_i}"),
    },
}

# Generic sentences: distractors in responses and filler in profiles (shared on purpose, so
# that word matching meets generic words that do occur in the profile).
GENERIC = ("Let me know if Thursday works", "Hope the week is treating you well",
           "The printer on the second floor is broken again", "Traffic was terrible this morning",
           "Can you send me the slides when you get a chance?", "I still owe you for last time",
           "No rush on any of this", "My phone has been acting up, so email is best", "It has been a long week",
           "The forecast says rain on Saturday", "I'll check my calendar tonight",
           "Thanks again for the help yesterday", "We should catch up properly soon",
           "I might be a few minutes late", "Happy to change plans if needed",
           "Did you hear about the office move?", "The train was delayed twenty minutes",
           "I'll bring the folder you asked about", "Remind me to return your umbrella",
           "My sister is visiting next week", "I have a call at three", "The new schedule starts on Monday",
           "Let's keep it simple", "I'm free after four", "Can't believe it's already the end of the month",
           "I'll text you when I'm close", "Say hi to everyone for me", "The heating in my flat is broken again",
           "I finally finished that book you lent me", "Is the meeting room still booked?",
           "My neighbours are renovating, so it's noisy", "I slept badly, so forgive any typos",
           "We can split the bill as usual", "I'm trying to spend less time on my phone",
           "That podcast you mentioned was great", "I need to renew my passport soon")

# (key, instructions, subjects, openers): the task input and the response's first sentence.
REQUESTS = (
    ("weekend", ("Suggest a weekend plan to a friend", "Write a message proposing plans for the weekend"),
     ("Weekend plans", "This weekend", "Saturday?"),
     ("Here's an idea for the weekend", "I've been thinking about what to do this weekend",
      "I have a plan for Saturday")),
    ("lunch", ("Write a note to a colleague about lunch", "Ask a coworker to grab lunch"),
     ("Lunch on Friday", "Team lunch", "Lunch tomorrow?"),
     ("Quick one about lunch", "Are we still on for lunch?", "I was hoping we could grab lunch")),
    ("dinner", ("Invite a friend over for dinner", "Write a dinner invitation to a friend"),
     ("Dinner at mine", "Dinner next week", "Come for dinner"),
     ("Would you like to come over for dinner?", "I'm hosting a small dinner", "Dinner at my place soon?")),
    ("visit", ("Give a friend tips for their visit", "Write to a friend who is coming to visit"),
     ("Your visit", "Tips for your trip", "When you get here"),
     ("So glad you're coming to visit", "A few tips before you arrive", "I can't wait to see you")),
    ("catch_up", ("Write to an old friend to catch up", "Send a catch-up message to a friend"),
     ("Long time no see", "Catching up", "How are things?"),
     ("It's been ages", "I was just thinking about you", "Sorry I've been so quiet lately")),
    ("intro", ("Introduce yourself to a new team", "Write a short introduction for your new colleagues"),
     ("Hello from the new person", "Introduction", "Nice to meet you all"),
     ("Hi everyone, I just joined the team", "A quick hello to all of you", "I'm the new face around here")),
    ("late", ("Apologize to a friend for being late", "Write a message saying you will be late"),
     ("Running behind", "Sorry, late again", "Delayed"),
     ("I'm so sorry for the delay", "Apologies, I'm behind schedule", "I'm going to be late, sorry")),
    ("thanks", ("Thank a neighbour for their help", "Write a thank-you note to a neighbour"),
     ("Thank you", "Thanks for yesterday", "Much appreciated"),
     ("Thank you so much for your help", "I owe you one for yesterday", "That was really kind of you")),
    ("update", ("Send a weekly update to a friend", "Tell a friend how your week went"),
     ("My week", "Weekly update", "News from me"),
     ("Here's my week in a nutshell", "Quick update from my side", "A lot happened this week")),
    ("holiday", ("Describe your holiday plans to a colleague", "Tell a coworker about your time off"),
     ("Time off", "Holiday plans", "Out of office soon"),
     ("I'm taking a few days off soon", "Just so you know, I'll be away", "My holiday is finally booked")),
    ("birthday", ("Invite friends to your birthday", "Write a birthday party invitation"),
     ("Birthday drinks", "My birthday", "Party on Friday"),
     ("I'm turning another year older", "You're invited to my birthday", "Birthday plans are set")),
    ("favor", ("Ask a friend for a small favor", "Write a message asking for help"),
     ("A small favor", "Could you help?", "Quick request"),
     ("I have a small favor to ask", "Could you help me with something?", "Sorry to bother you")),
)

PROFILE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": ("Moved to {city} three years ago and still love it", "Another grey morning in {city}",
             "Visitors to {city} always ask me for tips", "Rent in {city} keeps going up",
             "Nothing beats {city} in the spring"),
    "diet": ("I've been {diet} since university", "Being {diet}, I mostly cook at home",
             "Any {diet} recipes to recommend?", "Yes, I'm {diet}, and no, it's not hard"),
    "job": ("Long day at work, the life of {job_a}", "I work as {job_a}", "Ten years as {job_a} this spring",
            "People assume being {job_a} is easy"),
    "pet": ("My {pet}, {pet_name}, turned five today", "{pet_name} the {pet} is asleep on my feet again",
            "Adopted a {pet} called {pet_name} last spring", "My {pet} {pet_name} gets all my news first"),
    "hobby": ("Spent the whole Saturday on {hobby}", "{hobby} is the only thing that clears my head",
              "Thinking about getting more serious about {hobby}", "Started {hobby} last year and I'm hooked"),
}
PROFILE_KINDS = {  # kind -> (text prefix, titles)
    "post": ("", ("Weekend", "Life update", "Random thought", "Today", "Small wins", "Monday mood")),
    "note": ("Note to self: ", ("Note to self", "Reminder", "To do", "Memo")),
    "bio": ("About me: ", ("About me", "Bio", "Profile", "Hello")),
}

_SLOT = re.compile(r"\{(\w+)\}")
_WORD = re.compile(r"\S+")


def norm_word(w: str) -> str:
    """Lower-case, punctuation stripped: the word-matching key (``"Arthur's,"`` -> ``"arthurs"``)."""
    return re.sub(r"[\W_]+", "", w.lower())


def words_of(text: str) -> list[str]:
    return [k for k in (norm_word(w) for w in _WORD.findall(text)) if k]


def _article(noun: str) -> str:
    return "an" if noun[0].lower() in "aeiou" else "a"


@dataclass
class Persona:
    pid: str
    name: str
    city: str
    diet: str
    job: str
    pet: str
    pet_name: str
    hobby: str
    signoff: str | None   # rendered, e.g. "Cheers, Maria"
    emoji: str | None
    exclaim: str | None   # "!!" / "!!!" habit, or None
    lowercase: bool

    def copied(self) -> dict[str, str]:
        """Slot -> value ("glue|span") for copied mentions."""
        return {"city": f"|{self.city}", "diet": f"|{self.diet}", "job_a": f"{_article(self.job)} |{self.job}",
                "pet": f"|{self.pet}", "pet_name": f"|{self.pet_name}", "hobby": f"|{self.hobby}"}

    def implied_options(self, attr: str) -> tuple[str, ...]:
        return {"city": CITIES[self.city], "diet": DIETS[self.diet], "job": JOBS[self.job],
                "pet": PETS[self.pet], "hobby": HOBBIES[self.hobby]}[attr]


def _slot_attr(slot: str) -> str:
    return {"job_a": "job", "pet_name": "pet"}.get(slot, slot.removesuffix("_i"))


def render(template: str, values: dict[str, str], kinds: dict[str, str]) -> tuple[str, list[dict]]:
    """Fill ``{slot}``s; each slot's span part becomes a labelled span (offsets into the result)."""
    out, spans, pos = [], [], 0
    for i, piece in enumerate(_SLOT.split(template)):
        if i % 2 == 0:
            out.append(piece)
            pos += len(piece)
            continue
        glue, _, span = values[piece].rpartition("|")
        out.append(glue + span)
        start = pos + len(glue)
        spans.append({"start": start, "end": start + len(span), "kind": kinds[piece], "attribute": _slot_attr(piece)})
        pos += len(glue) + len(span)
    text = "".join(out)
    if text and text[0].islower():  # a sentence that starts with a slot ("the Tagus ...")
        text = text[0].upper() + text[1:]
    return text, spans


class _Writer:
    """Builds one text sentence by sentence, tracking spans, in one persona's style."""

    def __init__(self, persona: Persona, rng: random.Random, exclaim_p: float):
        self.p, self.rng, self.exclaim_p = persona, rng, exclaim_p
        self.text, self.spans = "", []

    def _add(self, piece: str, spans: list[dict], sep: str = " ") -> None:
        if self.text:
            self.text += sep
        off = len(self.text)
        self.text += piece
        self.spans += [{**s, "start": s["start"] + off, "end": s["end"] + off} for s in spans]

    def sentence(self, body: str, spans: list[dict], emoji: bool = False) -> None:
        if body.endswith("?"):
            end, end_span = "", None
        elif self.p.exclaim and self.rng.random() < self.exclaim_p:
            end, end_span = self.p.exclaim, "style"
        else:
            end, end_span = ".", None
        spans = list(spans)
        if end_span:
            spans.append({"start": len(body), "end": len(body) + len(end), "kind": "style", "attribute": "exclaim"})
        body += end
        if emoji and self.p.emoji:
            spans.append({"start": len(body) + 1, "end": len(body) + 1 + len(self.p.emoji), "kind": "style",
                          "attribute": "emoji"})
            body += " " + self.p.emoji
        self._add(body, spans)

    def signoff(self, sep: str) -> None:
        if self.p.signoff:
            self._add(self.p.signoff, [{"start": 0, "end": len(self.p.signoff), "kind": "style",
                                        "attribute": "signoff"}], sep=sep)

    def finish(self) -> tuple[str, list[dict]]:
        text, spans = self.text, sorted(self.spans, key=lambda s: s["start"])
        if self.p.lowercase:
            lowered = text.lower()
            assert len(lowered) == len(text)  # offsets survive lower-casing (no such letters as "İ")
            covered = [(s["start"], s["end"]) for s in spans]
            # The habit shows wherever a capital was due: label those words as style.
            for m in re.finditer(r"[^\W\d_][\w'’-]*", text):
                if any(c.isupper() for c in m.group()) and not any(a < m.end() and m.start() < b for a, b in covered):
                    spans.append({"start": m.start(), "end": m.end(), "kind": "style", "attribute": "lowercase"})
            text, spans = lowered, sorted(spans, key=lambda s: s["start"])
        return text, spans


def make_persona(rng: random.Random, pid: str) -> Persona:
    name = rng.choice(FIRST_NAMES)
    return Persona(
        pid=pid, name=name, city=rng.choice(sorted(CITIES)), diet=rng.choice(sorted(DIETS)),
        job=rng.choice(sorted(JOBS)), pet=rng.choice(sorted(PETS)), pet_name=rng.choice(PET_NAMES),
        hobby=rng.choice(sorted(HOBBIES)),
        signoff=rng.choice(SIGNOFFS).format(n=name) if rng.random() < 0.8 else None,
        emoji=rng.choice(EMOJIS) if rng.random() < 0.6 else None,
        exclaim=rng.choice(EXCLAIMS) if rng.random() < 0.5 else None,
        lowercase=rng.random() < 0.25)


def make_profile(p: Persona, rng: random.Random, n_items: int) -> list[dict]:
    """``n_items`` items that together state every attribute and show every habit at least twice."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    per_item: list[list[str]] = [[] for _ in range(n_items)]
    for i, a in enumerate(attrs):  # every attribute at least once
        per_item[i % n_items].append(a)
    for item in per_item:  # some repetition, as real histories have
        if rng.random() < 0.4:
            extra = rng.choice([a for a in ATTRIBUTES if a not in item] or list(ATTRIBUTES))
            item.append(extra)
    # Habits on at least two items (all items when there are fewer than two).
    habit_items = {h: set(rng.sample(range(n_items), min(2, n_items))) for h in ("signoff", "emoji", "exclaim")}
    values = {**p.copied()}
    kinds = {k: "copied" for k in values}
    items = []
    for i, item_attrs in enumerate(per_item):
        kind = "bio" if len(item_attrs) >= 2 and rng.random() < 0.4 else rng.choice(("post", "note"))
        prefix, titles = PROFILE_KINDS[kind]
        sentences = [render(rng.choice(PROFILE_TEMPLATES[a]), values, kinds)[0] for a in item_attrs]
        sentences += rng.sample(GENERIC, rng.randint(0, 2))
        rng.shuffle(sentences)
        w = _Writer(p, rng, exclaim_p=1.0 if i in habit_items["exclaim"] else 0.3)
        emoji_at = rng.randrange(len(sentences)) if i in habit_items["emoji"] else -1
        for j, s in enumerate(sentences):
            w.sentence(s, [], emoji=j == emoji_at)
        if i in habit_items["signoff"] or (kind != "bio" and rng.random() < 0.5):
            w.signoff(" ")
        text, _ = w.finish()
        item = {"title": rng.choice(titles), "text": prefix + text}
        if p.lowercase:  # the habit covers everything this user writes
            item = {k: v.lower() for k, v in item.items()}
        items.append(item)
    return items


def make_record(p: Persona, profile: list[dict], rng: random.Random, request: tuple, idx: int,
                implied_p: float = 0.5) -> dict:
    key, instructions, subjects, openers = request
    profile_words = set(words_of(" ".join(f"{it['title']} {it['text']}" for it in profile)))
    values, kinds = dict(p.copied()), {}
    body: list[tuple[str, list[dict]]] = []
    for attr in rng.sample(ATTRIBUTES, rng.randint(2, 3)):
        # implied values must not share a word with the profile (else they would be copied)
        options = [v for v in p.implied_options(attr)
                   if not set(words_of(v.rpartition("|")[2])) & profile_words]
        if options and rng.random() < implied_p:
            values[f"{attr}_i"] = rng.choice(options)
            template = rng.choice(ATTR_TEMPLATES[attr]["implied"])
        else:
            template = rng.choice(ATTR_TEMPLATES[attr]["copied"])
        for slot in _SLOT.findall(template):
            kinds[slot] = "implied" if slot.endswith("_i") else "copied"
        body.append(render(template, values, kinds))
    body += [(g, []) for g in rng.sample(GENERIC, rng.randint(1, 2))]
    rng.shuffle(body)
    w = _Writer(p, rng, exclaim_p=0.6)
    emoji_at = set(rng.sample(range(1 + len(body)), rng.randint(1, 2)))
    for j, (s, spans) in enumerate([(rng.choice(openers), [])] + body):
        w.sentence(s, spans, emoji=j in emoji_at)
    w.signoff("\n\n")
    output, spans = w.finish()
    return {"id": f"syn-{p.pid}-{idx}", "user_id": p.pid,
            "input": f"{rng.choice(instructions)}. Subject: {rng.choice(subjects)}",
            "output": output, "profile": profile, "spans": spans, "request": key}


def generate(seed: int = 0, n_personas: int = 200, requests_per_persona: int = 4, items_per_profile: int = 4,
             fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), implied_p: float = 0.5) -> dict[str, list[dict]]:
    """Records per split (``train``/``val``/``test``), split by persona."""
    if n_personas < 3:
        raise ValueError("n_personas must be >= 3 (one persona per split at least)")
    if not 1 <= requests_per_persona <= len(REQUESTS):
        raise ValueError(f"requests_per_persona must be in 1..{len(REQUESTS)}")
    if items_per_profile < 1:
        raise ValueError("items_per_profile must be >= 1")
    n_val = max(1, round(n_personas * fractions[1]))
    n_test = max(1, round(n_personas * fractions[2]))
    n_train = n_personas - n_val - n_test
    if n_train < 1:
        raise ValueError("fractions leave no training persona")
    order = list(range(n_personas))
    random.Random(f"synthetic-split:{seed}").shuffle(order)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i in range(n_personas):
        rng = random.Random(f"synthetic:{seed}:{i}")  # per-persona stream: one persona never shifts another
        p = make_persona(rng, f"p{i:04d}")
        profile = make_profile(p, rng, items_per_profile)
        for j, req in enumerate(rng.sample(REQUESTS, requests_per_persona)):
            out[split_of[i]].append(make_record(p, profile, rng, req, j, implied_p))
    return out


def datasheet(counts: dict[str, int], settings: dict) -> str:
    table = "\n".join(f"| {s} | {counts[s]} |" for s in SPLITS)
    kw = ", ".join(f"`{k}={v}`" for k, v in settings.items())
    return f"""# Synthetic personal-token benchmark

Generated by `percontrast/datasets/synthetic.py` (no external data; all text is template-made).
Task `email`: profile items `{{title, text}}`, input `<instruction>. Subject: <subject>`.
Every record has `spans`: character offsets into `output` labelled `copied` (words that
appear in the profile), `implied` (follow from the profile, none of their words in it) or
`style` (sign-off, emoji, exclamation habit, lowercase habit). The rest is generic.
Splits are by persona (no persona in two splits). Same seed, same bytes.

| split | records |
|---|---|
{table}

Settings: {kw}
"""


def prepare_synthetic(out_dir: str | Path, seed: int = 0, n_personas: int = 200, requests_per_persona: int = 4,
                      items_per_profile: int = 4, implied_p: float = 0.5) -> dict:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``meta.json``, ``DATASHEET.md``; return counts."""
    settings = {"seed": seed, "n_personas": n_personas, "requests_per_persona": requests_per_persona,
                "items_per_profile": items_per_profile, "implied_p": implied_p}
    splits = generate(**settings)
    out = Path(out_dir)
    for s in SPLITS:
        write_jsonl_atomic(out / f"{s}.jsonl", splits[s])
    counts = {s: len(splits[s]) for s in SPLITS}
    spans = {k: sum(1 for s in SPLITS for r in splits[s] for sp in r["spans"] if sp["kind"] == k) for k in KINDS}
    meta = {"dataset": "synthetic", "task": "email", "settings": settings, "counts": counts, "spans": spans}
    write_text_atomic(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out / "DATASHEET.md", datasheet(counts, settings))
    return counts
