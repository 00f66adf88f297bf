"""Made-up passages for reading prompts: short texts about invented people, companies,
products and sales, with the facts to pull out woven into the sentences.

Extraction, rating, classification and tabulation prompts need a text to work on, and the
answers to them copy names and numbers out of it: drafting those copies is a skill of its own
that questions without a passage never teach. The values are drawn from a seeded
`random.Random`, so the same seed gives the same passages.
"""

from __future__ import annotations

import random

FIRST_NAMES = (
    "Amara", "Ben", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hiro", "Isabel", "Jonas", "Kofi", "Lena",
    "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Yusuf",
    "Zoe", "Aiko", "Bruno", "Carmen", "Dmitri", "Esther", "Felix", "Hana", "Ivan", "Julia", "Kenji", "Leila",
)
LAST_NAMES = (
    "Adams", "Becker", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Hoffman", "Ito", "Jensen", "Khan",
    "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn", "Rossi", "Silva", "Tanaka", "Umarov",
    "Valdez", "Weber", "Xu", "Yilmaz", "Zhang", "Novak", "Larsen", "Mendes", "Haddad",
)
JOBS = (
    "nurse", "architect", "software engineer", "teacher", "chef", "pilot", "lawyer", "farmer", "journalist",
    "electrician", "pharmacist", "graphic designer", "accountant", "marine biologist", "firefighter",
    "librarian", "photographer", "civil engineer", "veterinarian", "translator",
)
# (city, country, language)
PLACES = (
    ("Lisbon", "Portugal", "Portuguese"), ("Nairobi", "Kenya", "Swahili"), ("Oslo", "Norway", "Norwegian"),
    ("Hanoi", "Vietnam", "Vietnamese"), ("Lima", "Peru", "Spanish"), ("Warsaw", "Poland", "Polish"),
    ("Seoul", "South Korea", "Korean"), ("Cairo", "Egypt", "Arabic"), ("Dublin", "Ireland", "English"),
    ("Budapest", "Hungary", "Hungarian"), ("Manila", "the Philippines", "Filipino"), ("Athens", "Greece", "Greek"),
    ("Bogota", "Colombia", "Spanish"), ("Helsinki", "Finland", "Finnish"), ("Jakarta", "Indonesia", "Indonesian"),
    ("Prague", "the Czech Republic", "Czech"), ("Accra", "Ghana", "English"), ("Ankara", "Turkey", "Turkish"),
    ("Montevideo", "Uruguay", "Spanish"), ("Stockholm", "Sweden", "Swedish"), ("Bangkok", "Thailand", "Thai"),
    ("Vienna", "Austria", "German"), ("Wellington", "New Zealand", "English"), ("Tunis", "Tunisia", "Arabic"),
)
COMPANY_HEADS = ("North", "Blue", "Silver", "Bright", "Green", "Iron", "Cedar", "Nova", "Summit", "River", "Apex", "Harbor")
COMPANY_TAILS = ("wind Labs", "peak Foods", "line Logistics", "stone Energy", "field Health", "works Robotics",
                 "gate Software", "bay Textiles", "light Media", "brook Motors")
PRODUCTS = (
    "wireless headphones", "robot vacuum", "smartwatch", "e-reader", "espresso machine", "electric scooter",
    "standing desk", "air purifier", "mechanical keyboard", "hiking backpack", "phone", "laptop",
    "blender", "camera", "tent", "mattress",
)
TITLE_WORDS = (("The Silent", "The Last", "A Distant", "The Hidden", "Broken", "The Golden", "Midnight", "The Long"),
               ("Harbor", "Orchard", "Signal", "Garden", "Winter", "Frontier", "Lantern", "Voyage", "Promise", "River"))
PRAISE = (
    "it exceeded my expectations", "the quality is outstanding", "I would buy it again without hesitation",
    "it was worth every penny", "everything about it feels well thought out", "it works exactly as advertised",
    "the experience was a delight from start to finish", "it is easily the best I have tried",
)
COMPLAINTS = (
    "it stopped working after two weeks", "the instructions were confusing", "it is far too expensive for what it does",
    "the customer service never replied", "it felt cheap and flimsy", "it was a complete waste of time",
    "I regret buying it", "nothing about it lived up to the hype",
)
MIXED = (
    "it has some good points but also some clear flaws", "it is decent, though not remarkable",
    "parts of it were great while others fell flat", "it does the job, but I expected more for the price",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
REGIONS = ("North", "South", "East", "West")


def person(rng: random.Random) -> dict:
    city, country, language = rng.choice(PLACES)
    return {"name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", "age": rng.randint(21, 78),
            "job": rng.choice(JOBS), "city": city, "country": country, "language": language}


def company_name(rng: random.Random) -> str:
    return rng.choice(COMPANY_HEADS) + rng.choice(COMPANY_TAILS)


def title(rng: random.Random) -> str:
    return f"{rng.choice(TITLE_WORDS[0])} {rng.choice(TITLE_WORDS[1])}"


def people_passage(rng: random.Random, n: int) -> str:
    """n sentences, each introducing one person (name, age, job, city) in its own words."""
    forms = (
        "{name} is a {age}-year-old {job} who lives in {city}, {country}.",
        "Born {age} years ago, {name} now works as a {job} in {city}.",
        "In {city}, {name} ({age}) has spent the last few years as a {job}.",
        "{name}, {age}, moved to {city} to start a new job as a {job}.",
        "The {job} {name} celebrated a {age}th birthday last week in {city}, {country}.",
    )
    return " ".join(rng.choice(forms).format(**person(rng)) for _ in range(n))


def company_passage(rng: random.Random, n: int) -> str:
    """n lines on invented companies: chief executive, revenue and profit for one year."""
    year = rng.randint(2015, 2024)
    lines = []
    for _ in range(n):
        revenue = rng.randint(12, 900) / 10
        profit = round(revenue * rng.uniform(-0.05, 0.3), 1)
        boss = person(rng)["name"]
        form = rng.choice((
            "{company}, whose chief executive is {boss}, had revenue of ${revenue} billion and a profit of ${profit} billion in {year}.",
            "In {year}, {company} (CEO: {boss}) earned ${revenue} billion in revenue, keeping ${profit} billion as profit.",
            "{boss} leads {company}, which closed {year} with ${revenue} billion of sales and ${profit} billion of profit.",
        ))
        lines.append("- " + form.format(company=company_name(rng), boss=boss, revenue=revenue, profit=profit, year=year))
    return "\n".join(lines)


def reviews_passage(rng: random.Random, n: int) -> str:
    """n numbered reviews of products, films or restaurants: positive, negative or mixed."""
    subjects = (lambda: f"the {rng.choice(PRODUCTS)}", lambda: f"the film '{title(rng)}'",
                lambda: f"the restaurant {title(rng).split()[-1]} Kitchen")
    lines = []
    for i in range(1, n + 1):
        about = rng.choice(subjects)()
        tone = rng.choice((PRAISE, COMPLAINTS, MIXED))
        first, second = rng.sample(tone, 2) if len(tone) > 1 else (tone[0], tone[0])
        lines.append(f"{i}. I tried {about} last month: {first}, and {second}.")
    return "\n".join(lines)


def sales_table(rng: random.Random, months: int) -> str:
    """CSV of monthly units and revenue per product and region."""
    products = rng.sample(PRODUCTS, 2)
    year = rng.randint(2018, 2024)
    start = rng.randint(0, 12 - months)
    rows = ["Month,Region,Product,Units,Revenue"]
    for m in MONTHS[start : start + months]:
        for product in products:
            region = rng.choice(REGIONS)
            units = rng.randint(20, 900)
            rows.append(f"{m} {year},{region},{product},{units},{units * rng.randint(15, 400)}")
    return "\n".join(rows)


def news_passage(rng: random.Random) -> str:
    """A short news item naming people, organisations and places."""
    a, b = person(rng), person(rng)
    company = company_name(rng)
    city, country, _ = rng.choice(PLACES)
    other_city, other_country, _ = rng.choice(PLACES)
    forms = (
        "{company} announced on Tuesday that it will open a new factory in {city}, {country}, investing {money} "
        "million dollars and creating about {count} jobs. Chief executive {a} said the site was chosen for its "
        "skilled workforce and its port. {b}, the mayor of {city}, welcomed the decision, while the regional union "
        "asked for guarantees on working conditions. Construction should start next spring.",
        "Researchers at the University of {city} and the {company} institute in {other_city} have published a study "
        "of {count} volunteers suggesting that short daily walks improve sleep. Lead author {a} said the effect "
        "appeared within {weeks} weeks. {b}, a sleep specialist in {other_country}, called the results promising but "
        "asked for a larger trial.",
        "The {city} Lions beat {other_city} United {goals} in front of {count} fans on Saturday. Striker {a} scored "
        "twice before half-time, and coach {b} praised the team's defence. The club, sponsored by {company}, now "
        "travels to {other_country} for the cup semi-final.",
        "{company} has agreed to buy a rival for {money} million dollars, the companies said in {city} on Monday. "
        "{a}, who founded the rival in {other_city} {weeks} years ago, will join the board, and {b} will remain "
        "chief executive. Regulators in {country} must approve the deal.",
    )
    return rng.choice(forms).format(
        company=company, city=city, country=country, other_city=other_city, other_country=other_country,
        a=a["name"], b=b["name"], money=rng.randint(2, 90) * 10, count=rng.randint(3, 90) * 50,
        weeks=rng.randint(2, 12), goals=f"{rng.randint(1, 5)}-{rng.randint(0, 3)}",
    )
