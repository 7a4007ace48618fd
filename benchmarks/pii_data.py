"""Seeded generator of labelled web-like documents for the PII benchmark.

Documents imitate what a crawl holds — forum posts, contact pages, server-log snippets, shop e-mails,
blog prose, leaked forms — with PII embedded in prose and hard negatives around it: card numbers
that fail the Luhn check, IBANs with a wrong checksum, SSNs from never-issued ranges, version strings
(1.2.3.4.5), dates, times, MAC addresses, order and tracking numbers, file names (README.md,
main.rs), ASP.NET. Gold spans cover exactly the value (a URL without the sentence's full stop, a
phone number with its parentheses). The same seed gives the same documents::

    >>> docs = generate(3, seed=0)
    >>> docs[0].spans[0]
    (19, 57, 'EMAIL')
"""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass, field

PATTERN_TYPES = ("EMAIL", "URL", "PHONE", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS")
NER_TYPES = ("PERSON", "LOCATION")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FIRST = _words("James Mary Robert Patricia Michael Jennifer David Linda William Elizabeth Maria Jose Ahmed Fatima "
         "Wei Mei Hiroshi Yuki Priya Rahul Olga Ivan Chloe Lucas Emma Noah Sofia Mateo Aisha Omar Liam "
         "Zoe Hannah Lukas Ingrid Sven Carlos Ana Kwame Amara Thomas Sarah Daniel Laura Kevin Nina Pedro "
         "Elena Marco Julia")  # fmt: skip
LAST = _words("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Wilson "
        "Anderson Taylor Moore Jackson Martin Lee Thompson White Harris Clark Lewis Walker Young Allen King "
        "Wright Scott Nguyen Chen Wang Kim Patel Singh Kumar Tanaka Suzuki Mueller Schmidt Fischer Rossi "
        "Ferrari Novak Kowalski Okafor Mensah Silva Santos Dubois Jensen Larsen")  # fmt: skip
CITIES = ("London", "Paris", "Berlin", "Madrid", "Rome", "Amsterdam", "Vienna", "Warsaw", "Prague",
          "Dublin", "Lisbon", "Stockholm", "Oslo", "Helsinki", "Copenhagen", "Athens", "Chicago",
          "Boston", "Seattle", "Austin", "Denver", "Toronto", "Vancouver", "Sydney", "Melbourne",
          "Tokyo", "Osaka", "Seoul", "Mumbai", "Delhi", "Lagos", "Nairobi", "Cairo", "Mexico City",
          "Buenos Aires", "New York", "San Francisco", "Los Angeles", "Munich", "Hamburg")  # fmt: skip
WORDS = _words("garden river summit harbor maple cedar pixel nimbus orbit atlas falcon willow copper lumen "
         "quartz meadow beacon prairie vertex tundra coral ember sierra delta polar aurora")  # fmt: skip
AREA_CODES = (
    212,
    213,
    206,
    303,
    305,
    312,
    404,
    415,
    503,
    512,
    602,
    617,
    646,
    702,
    713,
    718,
    720,
    773,
    818,
    917,
)
TLDS = ("com", "com", "com", "org", "net", "io", "co.uk", "de")
MAIL_HOSTS = ("gmail.com", "yahoo.com", "outlook.com", "proton.me", "web.de", "mail.ru", "icloud.com")
FILES = ("README.md", "setup.py", "main.rs", "deploy.sh", "index.html", "config.yaml", "app.js", "Makefile")
PATHS = ("/blog/2023/10/how-to-bake-bread", "/products?id=1234&ref=home", "/docs/install#linux",
         "/about-us", "/news/local-elections-2024", "/search?q=cheap+flights", "/u/profile/settings",
         "/wiki/Main_Page", "/download/v2.4.1/setup.exe", "/")  # fmt: skip

# Sentence templates: {TYPE} is a labelled value; {lower_case} is filler or a hard negative.
PROSE = [
    "I upgraded to {version} last week and the build finally passed.",
    "The parcel left the warehouse on {date} with tracking number {tracking}.",
    "Your order {order} has been confirmed; the total was {price}.",
    "We met around {time} near the old {word} market.",
    "See {file} for the install steps, e.g. running the script twice.",
    "Prices start at {price} for the basic plan and {price} for the pro plan.",
    "The recipe needs 250 g of flour, 2 eggs and about {price} worth of {word} berries.",
    "After the {word} update to {version}, the app crashes on start.",
    "Our team scored 3-1 on {date}, the best result since 2019.",
    "The {word} bridge is 1,204 m long and was finished in 1932.",
    "Firmware {version} fixes the bug where the router rebooted every 24 hours.",
    "Invoice {order} is due on {date}; reference number {refnum}.",
    "The device's MAC address {mac} shows up in the logs at {time}.",
    "Honestly, ASP.NET and Node.js both work fine for a small {word} project.",
    "ISBN {isbn} is the second edition, printed in {year}.",
    "The validator rejects test numbers like {bad_card} because the checksum fails.",
    "The bank said the IBAN {bad_iban} was invalid, so I checked it twice.",
    "Numbers such as {bad_ssn} were never issued, so the form flagged them.",
    "Build {build} of the compiler was tagged at {time} on {date}.",
    "Coordinates 52.5200, 13.4050 put you right in the middle of the {word} district.",
    "Call centre hours changed on {date}; the old number 123-456-7890 no longer works.",
    "Commit {hexhash} reverted the change to {file}.",
    "It took {minutes} minutes to walk from the station, i.e. longer than the map said.",
    "Account {account} was closed after 12 months without activity.",
    "The {word} festival drew 12,500 visitors, up 8.5% on last year.",
    "Temperatures reached 31.5 degrees on {date}, a record for the month.",
    "Session {uuid} expired after 30 minutes.",
    "The invalid address 256.300.12.1 in the config caused the outage.",
]
PII = [
    "You can reach me at {EMAIL} if you have questions.",
    "Call us at {PHONE} between 9am and 5pm.",
    "Please wire the deposit to IBAN {IBAN} before {date}.",
    "My card {CREDIT_CARD} was charged twice for order {order}.",
    "The server at {IP4} stopped responding after the update to {version}.",
    "Connections from {IP6} are blocked by the firewall since {date}.",
    "The leaked form listed her social security number as {SSN}.",
    "More details on our website: {URL}.",
    "Check out {URL} for the full recipe (and the photos).",
    "Send your CV to {EMAIL} or phone {PHONE}.",
    "Reply to {EMAIL}, not to the noreply address.",
    "If the link is dead, try the mirror ({URL}) instead.",
    "I called {PHONE} three times and nobody picked up.",
    "Refunds go to the account with IBAN {IBAN} within 5 working days.",
    "Failed login attempts came from {IP4} and {IP4} at {time}.",
    "Text me on {PHONE} when you land.",
    "Contact {PERSON} at {EMAIL} for press enquiries.",
    "{PERSON} from {LOCATION} wrote to {EMAIL} about the broken link {URL}.",
    "The payment with card number {CREDIT_CARD} was declined on {date}.",
    "SSN {SSN} and date of birth {date} were visible in the screenshot.",
]
# Less tidy forms seen on real pages: markup leftovers, ports, extensions, non-ASCII, mixed case.
MESSY = [
    "Details in [our FAQ]({URL}) and the changelog.",
    "Questions go to <{EMAIL}>, answers within 48 hours.",
    "Use the mailto:{EMAIL} link at the bottom of the page.",
    "Toll-free: {PHONE_TOLLFREE}, ext. 204 for billing.",
    "The proxy listens on {IP4}:8080 and forwards to {IP4}:443.",
    "Whitelisted range: {IP4}/24 (office network).",
    "Grüße aus München! Schreib mir an {EMAIL_UNICODE} oder ruf an: {PHONE}.",
    "E-MAIL: {EMAIL_UPPER} (please do not send attachments).",
    "Follow @{word}_{word} for updates, or write to {word} at {word} dot com.",
    "Tracking links look like {URL_TRACKING}, so strip them.",
    "He is 5'11\" and weighs 82 kg; the seat number was 14-B.",
]
NAMES = [
    "{PERSON} said the {word} meeting in {LOCATION} went well.",
    "Thanks to {PERSON} for the photos from {LOCATION}.",
    "I agree with {PERSON} here, the {word} plan makes no sense.",
    "We flew from {LOCATION} to {LOCATION} on {date}.",
    "Yesterday {PERSON} and {PERSON} presented the {word} results.",
]
FILLER = [
    "This is my first post here, so please be kind.",
    "It rained all weekend, which was fine because we stayed in and cooked.",
    "The documentation is fine, but the examples could be better.",
    "Has anyone else seen this problem after the latest update?",
    "We are open every day except public holidays.",
    "Shipping is free for orders over fifty dollars.",
    "The kids loved it and we will definitely come back next year.",
    "All prices include tax, and returns are accepted within thirty days.",
    "I followed the guide step by step and it worked the second time.",
    "Honestly the view from the top was worth the climb.",
]


@dataclass
class Document:
    text: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    """Gold findings: start, end (characters) and entity type."""


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def iban_check(country: str, bban: str) -> str:
    number = int("".join(str(int(ch, 36)) for ch in bban + country + "00"))
    return f"{98 - number % 97:02d}"


IBAN_FORMATS = {"DE": "n18", "GB": "a4n14", "FR": "n23", "NL": "a4n10", "ES": "n20", "IT": "a1n22",
                "CH": "n17", "BE": "n12", "AT": "n16", "PL": "n24"}  # fmt: skip


class Generator:
    """Values and documents from one seeded random stream."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, seq):
        return self.rng.choice(seq)

    def digits(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789") for _ in range(n))

    # --- labelled values ---------------------------------------------------------------------------
    def person(self) -> str:
        return f"{self.pick(FIRST)} {self.pick(LAST)}"

    def email(self) -> str:
        first, last = self.pick(FIRST).lower(), self.pick(LAST).lower()
        local = self.pick([f"{first}.{last}", f"{first[0]}{last}{self.rng.randint(1, 99)}", f"{first}_{last}+news",
                           f"{first}", "info", "support", f"{first.title()}.{last.title()}"])  # fmt: skip
        host = self.pick(MAIL_HOSTS) if self.rng.random() < 0.5 else self.domain()
        return f"{local}@{host}"

    def domain(self) -> str:
        sub = self.pick(["", "", "www.", "mail.", "shop.", "blog."])
        return f"{sub}{self.pick(WORDS)}{self.pick(['', '-', ''])}{self.pick(WORDS)}.{self.pick(TLDS)}"

    def url(self) -> str:
        host = self.domain().removeprefix("www.")
        form = self.rng.random()
        if form < 0.55:
            return (
                f"{self.pick(['https', 'https', 'http'])}://{self.pick(['www.', ''])}{host}{self.pick(PATHS)}"
            )
        if form < 0.8:
            return f"www.{host}{self.pick(PATHS + ('',))}"
        return host

    def tracking_url(self) -> str:
        url = self.url()
        return url + ("&" if "?" in url else "?") + "utm_source=newsletter&utm_medium=email"

    def phone(self) -> str:
        # Assigned area codes and no fictional ranges (555-01xx, Ofcom's 07700 900xxx): a validating
        # engine such as presidio's (libphonenumber) rightly rejects numbers that cannot exist.
        area, exchange, line = self.pick(AREA_CODES), self.rng.randint(200, 999), self.digits(4)
        uk_mobile, london = (
            f"7{self.rng.randint(400, 999)} {self.digits(6)}",
            f"20 7{self.digits(3)} {self.digits(4)}",
        )
        return self.pick([
            f"({area}) {exchange}-{line}", f"{area}-{exchange}-{line}", f"{area}.{exchange}.{line}",
            f"+1 {area} {exchange} {line}", f"+1-{area}-{exchange}-{line}", f"{area} {exchange} {line}",
            f"+1 ({area}) {exchange}-{line}", f"+44 {london}", f"+44 {uk_mobile}", f"0{london}",
            f"+49 30 {self.digits(8)}", f"+33 1 {self.digits(2)} {self.digits(2)} {self.digits(2)} {self.digits(2)}",
        ])  # fmt: skip

    def card(self, valid: bool = True) -> str:
        prefix, length = self.pick([("4", 16), ("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15),
                                    ("37", 15), ("6011", 16), ("65", 16)])  # fmt: skip
        body = prefix + self.digits(length - len(prefix) - 1)
        check = luhn_digit(body)
        if not valid:
            check = str((int(check) + self.rng.randint(1, 9)) % 10)
        number = body + check
        sep = self.pick([" ", " ", "-", ""])
        if length == 15:
            return sep.join((number[:4], number[4:10], number[10:]))
        return sep.join(number[i : i + 4] for i in range(0, 16, 4))

    def iban(self, valid: bool = True) -> str:
        country, fmt = self.pick(list(IBAN_FORMATS.items()))
        bban = ""
        for kind, count in re.findall(r"([an])(\d+)", fmt):
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if kind == "a" else "0123456789"
            bban += "".join(self.rng.choice(alphabet) for _ in range(int(count)))
        check = iban_check(country, bban)
        if not valid:
            check = f"{(int(check) + self.rng.randint(1, 90)) % 97 + 2:02d}"[-2:]
        iban = country + check + bban
        if self.rng.random() < 0.7:
            return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
        return iban

    def ssn(self, valid: bool = True) -> str:
        area = (
            self.rng.choice([a for a in range(1, 900) if a != 666])
            if valid
            else self.pick([666, 0, 900, 987, 999])
        )
        group = self.rng.randint(1, 99)
        sep = "-" if self.rng.random() < 0.9 else " "
        return f"{area:03d}{sep}{group:02d}{sep}{self.rng.randint(1, 9999):04d}"

    def ipv4(self) -> str:
        if self.rng.random() < 0.4:
            return (
                self.pick(["10.0.", "192.168.", "172.16."])
                + f"{self.rng.randint(0, 255)}.{self.rng.randint(1, 254)}"
            )
        return ".".join(str(self.rng.randint(1, 254)) for _ in range(4))

    def ipv6(self) -> str:
        prefix = self.pick([0x20010DB8, 0xFE800000, 0x2A001450, 0x26064700])
        address = ipaddress.IPv6Address((prefix << 96) | self.rng.getrandbits(64) | (self.rng.getrandbits(16) << 64 if self.rng.random() < 0.5 else 0))  # fmt: skip
        return address.exploded if self.rng.random() < 0.2 else address.compressed

    # --- fillers and hard negatives ------------------------------------------------------------------
    def filler(self, name: str) -> str:
        r = self.rng
        values = {
            "word": lambda: self.pick(WORDS),
            "version": lambda: self.pick([f"{r.randint(1, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(1, 9)}",
                                          f"v{r.randint(1, 4)}.{r.randint(0, 20)}.{r.randint(0, 9)}",
                                          f"version {r.randint(1, 12)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 99)}"]),  # fmt: skip
            "build": lambda: f"{r.randint(1, 9)}.{r.randint(0, 9)}.{r.randint(10000, 40000)}.{r.randint(1000, 50000)}",
            "date": lambda: self.pick([f"{r.randint(2015, 2025)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
                                       f"{r.randint(1, 12):02d}/{r.randint(1, 28):02d}/{r.randint(2015, 2025)}",
                                       f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(2015, 2025)}",
                                       f"March {r.randint(1, 28)}, {r.randint(2015, 2025)}"]),  # fmt: skip
            "time": lambda: self.pick([f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
                                       f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}"]),  # fmt: skip
            "year": lambda: str(r.randint(1990, 2024)),
            "minutes": lambda: str(r.randint(5, 90)),
            "price": lambda: self.pick([f"${r.randint(1, 2999):,}.{r.randint(0, 99):02d}", f"€{r.randint(1, 500)},{r.randint(0, 99):02d}"]),
            "order": lambda: self.pick([f"#{r.randint(100000, 99999999)}", f"#A-{r.randint(10000, 99999)}",
                                        f"no. {self.digits(16)}", f"{r.randint(100, 999)}-{self.digits(7)}-{self.digits(7)}"]),  # fmt: skip
            "tracking": lambda: self.pick([f"1Z{self.digits(3)}AA1{self.digits(10)}", self.digits(16), self.digits(22)]),
            "refnum": lambda: self.digits(self.pick([9, 10, 12, 13])),
            "account": lambda: self.digits(self.pick([8, 10, 12])),
            "mac": lambda: ":".join(f"{r.randint(0, 255):02X}" for _ in range(6)),
            "isbn": lambda: f"978-{r.randint(0, 9)}-{self.digits(2)}-{self.digits(6)}-{r.randint(0, 9)}",
            "file": lambda: self.pick(FILES),
            "hexhash": lambda: f"{r.getrandbits(28):07x}",
            "uuid": lambda: f"{r.getrandbits(32):08x}-{r.getrandbits(16):04x}-4{r.getrandbits(12):03x}-a{r.getrandbits(12):03x}-{r.getrandbits(48):012x}",
            "bad_card": lambda: self.card(valid=False),
            "bad_iban": lambda: self.iban(valid=False),
            "bad_ssn": lambda: self.ssn(valid=False),
        }  # fmt: skip
        return values[name]()

    LABELLED = {"EMAIL": "EMAIL", "EMAIL_UNICODE": "EMAIL", "EMAIL_UPPER": "EMAIL", "PHONE_TOLLFREE": "PHONE", "URL": "URL", "URL_TRACKING": "URL", "PHONE": "PHONE", "CREDIT_CARD": "CREDIT_CARD", "IBAN": "IBAN",
                "SSN": "SSN", "IP4": "IP_ADDRESS", "IP6": "IP_ADDRESS", "PERSON": "PERSON", "LOCATION": "LOCATION"}  # fmt: skip

    def value(self, name: str) -> str:
        return {"EMAIL": self.email, "EMAIL_UPPER": lambda: self.email().replace("info", "Info").upper(),
                "EMAIL_UNICODE": lambda: f"{self.pick(['jürgen', 'zoë', 'françois', 'søren'])}.{self.pick(LAST).lower()}@{self.domain()}",
                "PHONE_TOLLFREE": lambda: f"1-{self.pick(['800', '888', '877'])}-{self.rng.randint(200, 999)}-{self.digits(4)}",
                "URL": self.url, "URL_TRACKING": self.tracking_url, "PHONE": self.phone, "CREDIT_CARD": self.card,
                "IBAN": self.iban, "SSN": self.ssn, "IP4": self.ipv4, "IP6": self.ipv6,
                "PERSON": self.person, "LOCATION": lambda: self.pick(CITIES)}[name]()  # fmt: skip

    # --- documents ----------------------------------------------------------------------------------
    def render(self, template: str, doc: Document) -> None:
        """Append ``template`` to ``doc`` with its placeholders filled and labelled."""
        pos = 0
        for m in re.finditer(r"\{(\w+)\}", template):
            doc.text += template[pos : m.start()]
            name = m.group(1)
            if name in self.LABELLED:
                value = self.value(name)
                doc.spans.append((len(doc.text), len(doc.text) + len(value), self.LABELLED[name]))
            else:
                value = self.filler(name)
            doc.text += value
            pos = m.end()
        doc.text += template[pos:]

    def paragraph(self, doc: Document, sentences: int, pii_share: float) -> None:
        for i in range(sentences):
            r = self.rng.random()
            pool = (PII if r < pii_share else MESSY if r < pii_share * 1.4 else NAMES if r < pii_share * 1.4 + 0.1
                    else PROSE if r < 0.75 else FILLER)  # fmt: skip
            self.render(("" if i == 0 else " ") + self.pick(pool), doc)
        doc.text += "\n\n"

    def document(self) -> Document:
        doc = Document("")
        kind = self.rng.random()
        if kind < 0.3:  # forum post
            self.render(self.pick(["Posted by {PERSON} on {date}\n\n", "Re: problem with {file}\n\n", "Quote from user{year}:\n\n"]), doc)  # fmt: skip
            for _ in range(self.rng.randint(1, 3)):
                self.paragraph(doc, self.rng.randint(2, 5), pii_share=0.2)
            if self.rng.random() < 0.3:
                self.render("-- \n{PERSON}\n{EMAIL}\n", doc)
        elif kind < 0.55:  # blog or news prose, few pattern types
            for _ in range(self.rng.randint(2, 4)):
                self.paragraph(doc, self.rng.randint(3, 6), pii_share=0.05)
        elif kind < 0.68:  # server log snippet in a tech post
            self.paragraph(doc, 2, pii_share=0.2)
            for _ in range(self.rng.randint(2, 6)):
                self.render(self.pick(["{date} {time} GET /{file} from {IP4} status 200\n",
                                       "{date} {time} WARN connection reset by {IP6}\n",
                                       "{date} {time} INFO worker {build} started\n",
                                       "{date} {time} ERROR {file} not found\n"]), doc)  # fmt: skip
        elif kind < 0.82:  # shop e-mail
            self.render(
                "Order confirmation {order}\n\nHello {PERSON},\n\nThank you for your order placed on {date}. ",
                doc,
            )
            self.render(self.pick(["Paid with the card ending in 4242. ", "Paid with card {CREDIT_CARD}. ",
                                   "Paid by bank transfer to {IBAN}. "]), doc)  # fmt: skip
            self.render(
                "Total: {price}. Tracking number: {tracking}.\nQuestions? Write to {EMAIL} or call {PHONE}.\n",
                doc,
            )
        elif kind < 0.94:  # contact page
            self.render("Contact us\n\nEmail: {EMAIL}\nPhone: {PHONE}\nWeb: {URL}\n", doc)
            self.paragraph(doc, self.rng.randint(2, 4), pii_share=0.1)
        else:  # leaked form
            self.render(
                "Name: {PERSON}\nSSN: {SSN}\nDOB: {date}\nPhone: {PHONE}\nIBAN: {IBAN}\nEmail: {EMAIL}\n", doc
            )
        doc.text = doc.text.rstrip()
        return doc


def generate(n: int, seed: int = 0) -> list[Document]:
    """``n`` labelled documents, the same for the same seed."""
    gen = Generator(seed)
    return [gen.document() for _ in range(n)]


if __name__ == "__main__":
    for d in generate(5):
        print(d.text, "\n", [(d.text[s:e], t) for s, e, t in d.spans], "\n" + "-" * 60)
