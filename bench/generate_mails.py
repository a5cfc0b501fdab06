"""Deterministic generator of realistic help-desk mails for benchmarks (stdlib only).

Every mail is built from its own ``random.Random(f"{seed}:{index}")``, so the output for a given
``seed`` is byte-identical between runs and platforms, and ``generate(n)`` is a prefix of
``generate(n + k)``. Mails are produced one at a time: memory does not grow with ``n``.

Mix (per mail, independent draws):

* language: Polish 45% (UTF-8 or ISO-8859-2, quoted-printable), Russian 20% (KOI8-R or
  windows-1251, base64), English 35% (us-ascii 7bit or UTF-8 quoted-printable); subjects and
  display names RFC 2047 encoded in the body's charset, attachment names RFC 2231 or RFC 2047;
* body: text/plain only or multipart/alternative (text + HTML); about a quarter are replies
  ("Re: [#1234] ...", In-Reply-To/References, quoted text);
* attachments: 70% none, 25% 10-200 kB, 5% 0.5-2 MB (total decoded size per mail, split over
  1-3 files). Sizes inside each bucket follow a truncated Pareto law (many small files, few big
  ones) tuned so that the average mail is ~55 kB on the wire, base64 included.

Attachment contents are slices of one pre-generated, pre-encoded pool of random bytes (with a
file-type magic number in front), which keeps 10,000 mails well under a minute.

CLI::

    python bench/generate_mails.py --count 10000 --out bench/out/mails [--seed 1]
"""

from __future__ import annotations

import argparse
import binascii
import html
import random
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.utils import format_datetime, formataddr
from io import BytesIO
from pathlib import Path

__all__ = ["GenStats", "generate", "main", "write_dir"]

WIRE_POLICY = policy.compat32.clone(linesep="\r\n")

# --- attachment size model (decoded bytes) ----------------------------------------------------------
P_NO_ATTACHMENT = 0.70
P_SMALL = 0.25  # the remaining 5% are large
SMALL_RANGE = (10_000, 200_000)
LARGE_RANGE = (500_000, 2_000_000)
SMALL_ALPHA = 1.2  # truncated Pareto shape: mean ~28 kB
LARGE_ALPHA = 5.0  # mean ~620 kB

B64_LINE_RAW = 57  # 57 raw bytes -> one 76-character base64 line
POOL_LINES = (LARGE_RANGE[1] // B64_LINE_RAW) * 2  # room for ~2 MB worth of different offsets

START = datetime(2026, 1, 5, 7, 30, tzinfo=UTC)


@dataclass(frozen=True)
class GenStats:
    count: int
    total_bytes: int

    @property
    def average_bytes(self) -> float:
        return self.total_bytes / self.count if self.count else 0.0


# --- vocabulary --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lang:
    code: str
    charsets: tuple[str, ...]
    first_m: tuple[str, ...]
    first_f: tuple[str, ...]
    last_m: tuple[str, ...]
    last_f: tuple[str, ...]
    greetings: tuple[str, ...]
    closings: tuple[str, ...]
    sentences: tuple[str, ...]
    subjects: tuple[str, ...]
    quote_intro: str
    departments: tuple[str, ...]
    companies: tuple[tuple[str, str], ...]  # (display company, domain)
    files: tuple[str, ...]
    utc_offset: tuple[int, ...]
    phone_prefix: str
    department_label: str


PL = Lang(
    code="pl",
    charsets=("utf-8", "iso-8859-2"),
    first_m=("Piotr", "Krzysztof", "Tomasz", "Paweł", "Michał", "Marcin", "Łukasz", "Grzegorz", "Jakub"),
    first_f=("Anna", "Katarzyna", "Małgorzata", "Agnieszka", "Joanna", "Barbara", "Ewa", "Żaneta", "Zofia"),
    last_m=("Nowak", "Kowalski", "Wiśniewski", "Wójcik", "Kamiński", "Lewandowski", "Zieliński", "Dąbrowski"),
    last_f=("Nowak", "Kowalska", "Wiśniewska", "Wójcik", "Kamińska", "Lewandowska", "Zielińska", "Dąbrowska"),
    greetings=("Dzień dobry,", "Witam,", "Szanowni Państwo,", "Cześć,", "Dzień dobry Panie Marku,"),
    closings=("Pozdrawiam", "Z poważaniem", "Pozdrawiam serdecznie", "Dziękuję i pozdrawiam"),
    sentences=(
        "Od dzisiaj rana nie mogę zalogować się do systemu księgowego.",
        "Po wpisaniu hasła pojawia się komunikat o błędzie i aplikacja się zamyka.",
        "Drukarka w pokoju 214 drukuje puste strony, wymiana tonera nie pomogła.",
        "Proszę o nadanie uprawnień do udziału sieciowego działu kadr.",
        "Nowy pracownik zaczyna pracę w poniedziałek i potrzebuje konta pocztowego.",
        "W załączeniu przesyłam zrzut ekranu z komunikatem błędu.",
        "Laptop bardzo wolno się uruchamia, a wentylator cały czas głośno pracuje.",
        "Od wczoraj nie działa połączenie VPN z domu, wcześniej wszystko było w porządku.",
        "Czy jest możliwość przeniesienia mojej skrzynki na nowy serwer przed końcem miesiąca?",
        "Faktura za usługi serwisowe zawiera błędny numer NIP, proszę o korektę.",
        "Na sali konferencyjnej nie działa rzutnik ani głośniki systemu wideokonferencji.",
        "Telefon służbowy nie synchronizuje kalendarza z pocztą od czasu aktualizacji.",
        "Proszę o instalację programu do obsługi podpisu elektronicznego na moim komputerze.",
        "Klienci zgłaszają, że formularz kontaktowy na stronie nie wysyła wiadomości.",
        "Monitor miga co kilka minut i na chwilę gaśnie, sprawdzałem już kabel.",
        "Sprawa jest dość pilna, ponieważ w piątek mija termin złożenia sprawozdania.",
        "Jestem dostępny pod numerem wewnętrznym 315 do godziny 16.",
        "Problem dotyczy całego zespołu, nie tylko mojego stanowiska.",
        "Próbowałam już restartu komputera i wylogowania, ale bez efektu.",
        "Proszę o informację, kiedy technik będzie mógł przyjść na miejsce.",
        "Hasło wygasło podczas mojego urlopu i teraz nie mogę go zmienić.",
        "Kopia zapasowa z zeszłej nocy zakończyła się błędem, raport w załączniku.",
        "Zamówione w zeszłym tygodniu stacje dokujące jeszcze do nas nie dotarły.",
        "Czy mogę prosić o zwiększenie limitu skrzynki pocztowej do 10 GB?",
    ),
    subjects=(
        "Problem z drukarką w pokoju {room}",
        "Brak dostępu do systemu księgowego",
        "Prośba o nadanie uprawnień - dział {dept}",
        "Nie działa VPN",
        "Konto dla nowego pracownika od poniedziałku",
        "PILNE: awaria poczty w oddziale {city}",
        "Zgłoszenie: wolno działający komputer",
        "Faktura nr {num}/2026 - prośba o korektę",
        "Zamówienie sprzętu - stacje dokujące",
        "Błąd przy zapisie dokumentu w systemie obiegu",
        "Wymiana monitora na stanowisku {room}",
        "Pytanie o licencję oprogramowania",
    ),
    quote_intro="W dniu {date} Helpdesk napisał(a):",
    departments=("księgowości", "kadr", "sprzedaży", "logistyki", "marketingu", "zarządu"),
    companies=(
        ("Budimex Serwis", "budserwis.example"),
        ("Zakłady Mięsne Łuków", "zm-lukow.example"),
        ("Kancelaria Żak i Wspólnicy", "kancelaria-zak.example"),
        ("Hurtownia Gęś", "hurtownia-ges.example"),
        ("Urząd Gminy Dębno", "ug-debno.example"),
    ),
    files=(
        "faktura_FV_{num}_2026.pdf",
        "Zrzut ekranu 2026-03-{day:02d} o 10.{num2:02d}.png",
        "zdjęcie_usterki_{num2}.jpg",
        "raport_kwartalny_Q1.xlsx",
        "umowa_serwisowa_skan.pdf",
        "logi_{num}.zip",
        "wniosek o dostęp.docx",
        "protokół_odbioru_{num}.pdf",
    ),
    utc_offset=(1,),
    phone_prefix="+48",
    department_label="Dział {}",
)

RU = Lang(
    code="ru",
    charsets=("koi8-r", "windows-1251"),
    first_m=("Александр", "Сергей", "Дмитрий", "Андрей", "Алексей", "Игорь", "Николай", "Юрий"),
    first_f=("Елена", "Ольга", "Наталья", "Татьяна", "Ирина", "Светлана", "Мария", "Юлия"),
    last_m=("Иванов", "Смирнов", "Кузнецов", "Попов", "Васильев", "Петров", "Соколов", "Фёдоров"),
    last_f=("Иванова", "Смирнова", "Кузнецова", "Попова", "Васильева", "Петрова", "Соколова", "Фёдорова"),
    greetings=("Здравствуйте!", "Добрый день!", "Добрый день, коллеги!", "Уважаемая служба поддержки,"),
    closings=("С уважением", "Спасибо", "Заранее спасибо", "С уважением и надеждой на быстрый ответ"),
    sentences=(
        "Со вчерашнего дня не работает сетевой принтер в бухгалтерии.",
        "При входе в систему появляется ошибка и программа закрывается.",
        "Прошу сбросить пароль к почтовому ящику, старый пароль истёк во время отпуска.",
        "Новому сотруднику отдела снабжения нужен доступ к VPN и общей папке.",
        "Компьютер очень медленно загружается, вентилятор постоянно шумит.",
        "В переговорной не работает проектор и система видеоконференций.",
        "Во вложении отправляю снимок экрана с текстом ошибки.",
        "Служебный телефон перестал синхронизировать календарь с почтой.",
        "Просим установить программу для электронной подписи на рабочее место.",
        "Клиенты жалуются, что форма обратной связи на сайте не отправляет сообщения.",
        "Монитор мигает каждые несколько минут, кабель уже проверили.",
        "Вопрос срочный, в пятницу сдаём квартальный отчёт.",
        "Проблема касается всего отдела, а не только моего компьютера.",
        "Перезагрузка и повторный вход в систему не помогли.",
        "Сообщите, пожалуйста, когда специалист сможет подойти.",
        "Резервное копирование прошлой ночью завершилось с ошибкой, журнал во вложении.",
        "Заказанные на прошлой неделе док-станции до нас так и не доехали.",
        "Можно ли увеличить размер почтового ящика до 10 ГБ?",
        "Мой внутренний номер 315, я на месте до шести вечера.",
        "Счёт за обслуживание содержит неверные реквизиты, просим исправить.",
    ),
    subjects=(
        "Не работает принтер в кабинете {room}",
        "Сброс пароля к почте",
        "Доступ к VPN для нового сотрудника",
        "СРОЧНО: не работает почта в филиале {city}",
        "Медленно работает компьютер",
        "Ошибка в системе документооборота",
        "Заявка на замену монитора",
        "Счёт {num} - неверные реквизиты",
        "Вопрос по лицензии на программу",
    ),
    quote_intro="{date}, Helpdesk пишет:",
    departments=("бухгалтерии", "кадров", "продаж", "логистики", "снабжения"),
    companies=(
        ("Завод Прогресс", "zavod-progress.example"),
        ("ТД Северный", "td-severny.example"),
        ("Логистик-Центр", "logistik-center.example"),
    ),
    files=(
        "счёт_{num}.pdf",
        "скриншот_ошибки.png",
        "отчёт_за_квартал.xlsx",
        "фото_{num2}.jpg",
        "журнал_{num}.zip",
        "договор_скан.pdf",
    ),
    utc_offset=(3,),
    phone_prefix="+7",
    department_label="Отдел {}",
)

EN = Lang(
    code="en",
    charsets=("us-ascii", "utf-8"),
    first_m=("James", "John", "Robert", "Michael", "David", "Daniel", "Thomas", "Mark"),
    first_f=("Mary", "Jennifer", "Linda", "Sarah", "Emily", "Laura", "Rachel", "Hannah"),
    last_m=("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Taylor"),
    last_f=("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Taylor"),
    greetings=("Hi,", "Hello,", "Hi team,", "Dear Support,", "Good morning,"),
    closings=("Best regards", "Thanks", "Kind regards", "Cheers", "Thank you in advance"),
    sentences=(
        "Since this morning I cannot log in to the accounting system.",
        "After entering my password I get an error message and the application closes.",
        "The printer in room 214 prints blank pages; replacing the toner did not help.",
        "Could you please grant me access to the HR network share?",
        "A new colleague starts on Monday and needs an e-mail account and a laptop.",
        "I have attached a screenshot of the error message.",
        "My laptop takes ages to boot and the fan is constantly running at full speed.",
        "The VPN connection stopped working yesterday evening, it was fine before.",
        "Is it possible to migrate my mailbox to the new server before the end of the month?",
        "The invoice for the maintenance contract has the wrong VAT number on it.",
        "The projector and the conference speakers in meeting room B are not working.",
        "My company phone no longer syncs the calendar since the last update.",
        "Please install the e-signature software on my workstation.",
        "Customers report that the contact form on our website does not send anything.",
        "The monitor flickers every few minutes and goes dark for a second.",
        "This is fairly urgent because the quarterly report is due on Friday.",
        "The whole team is affected, not just my workstation.",
        "I already tried restarting and logging out and back in, no luck.",
        "Please let me know when a technician can come over.",
        "Last night's backup job failed, the log is attached.",
        "The docking stations we ordered last week have not arrived yet.",
        "Could you increase my mailbox quota to 10 GB?",
        "I am reachable on extension 315 until 5 pm.",
    ),
    subjects=(
        "Printer in room {room} not working",
        "Cannot log in to the accounting system",
        "Access request - {dept} share",
        "VPN down",
        "New starter on Monday - account and laptop",
        "URGENT: e-mail outage in the {city} office",
        "Slow laptop",
        "Invoice {num} - wrong VAT number",
        "Docking stations order",
        "Error when saving documents",
        "Monitor replacement at desk {room}",
        "Software licence question",
    ),
    quote_intro="On {date}, Helpdesk wrote:",
    departments=("finance", "HR", "sales", "logistics", "marketing", "legal"),
    companies=(
        ("Northwind Traders", "northwind.example"),
        ("Contoso Ltd", "contoso.example"),
        ("Fabrikam Inc.", "fabrikam.example"),
        ("Tailspin Toys", "tailspin.example"),
    ),
    files=(
        "invoice_{num}.pdf",
        "screenshot.png",
        "IMG_{num}.JPG",
        "error_log_{num}.zip",
        "Q1 report.xlsx",
        "signed contract.pdf",
        "access request form.docx",
    ),
    utc_offset=(0, 1, -5),
    phone_prefix="+44",
    department_label="{} department",
)

LANGS: tuple[tuple[Lang, float], ...] = ((PL, 0.45), (RU, 0.20), (EN, 0.35))
CITIES = ("Kraków", "Gdańsk", "Łódź", "Poznań", "Wrocław", "Berlin", "London", "Riga")
CITIES_RU = ("Тверь", "Казань", "Пермь", "Самара")

MIME_TYPES = {
    "pdf": ("application", "pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"),
    "png": ("image", "png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    "jpg": ("image", "jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01"),
    "zip": ("application", "zip", b"PK\x03\x04\x14\x00\x08\x00\x08\x00"),
    "xlsx": (
        "application",
        "vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        b"PK\x03\x04\x14\x00\x06\x00\x08\x00",
    ),
    "docx": (
        "application",
        "vnd.openxmlformats-officedocument.wordprocessingml.document",
        b"PK\x03\x04\x14\x00\x06\x00\x08\x00",
    ),
}

MAILERS = (
    ("User-Agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Thunderbird/128.7.1"),
    ("X-Mailer", "Microsoft Outlook 16.0"),
    ("X-Mailer", "Apple Mail (2.3826.400.131.1.6)"),
    ("User-Agent", "Roundcube Webmail/1.6.9"),
    ("X-Mailer", "The Bat! (v10.5.3) Professional"),
    ("User-Agent", "K-9 Mail for Android"),
    (None, None),  # webmail that sends neither (e.g. Gmail)
)

HELPDESK_ADDRS = (
    ("Helpdesk", "pomoc@helpdesk.example.com"),
    ("IT Support", "support@helpdesk.example.com"),
    ("Serwis IT", "serwis@helpdesk.example.com"),
)

_TRANSLIT = str.maketrans(
    {
        "ą": "a", "ć": "c", "ę": "e", "ł": "l", "ń": "n", "ó": "o", "ś": "s", "ź": "z", "ż": "z",
        "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh", "з": "z",
        "и": "i", "й": "y", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r",
        "с": "s", "т": "t", "у": "u", "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh",
        "щ": "shch", "ъ": "", "ы": "y", "ь": "", "э": "e", "ю": "yu", "я": "ya",
    }
)  # fmt: skip


# --- attachment pool ---------------------------------------------------------------------------------


class _Pool:
    """Random bytes pre-encoded as CRLF-free base64 lines of 57 raw bytes each."""

    def __init__(self, seed: int) -> None:
        self.raw = random.Random(f"pool:{seed}").randbytes(POOL_LINES * B64_LINE_RAW)
        mv = memoryview(self.raw)
        self.b64 = "".join(
            binascii.b2a_base64(mv[i : i + B64_LINE_RAW]).decode("ascii") for i in range(0, len(self.raw), B64_LINE_RAW)
        )  # every line is exactly 77 characters: 76 + "\n"

    def base64_slice(self, rng: random.Random, size: int, magic: bytes) -> str:
        """base64 text (``\\n`` line ends) of ``magic`` + pool bytes, ``size`` bytes in total."""
        n_full, rem = divmod(size, B64_LINE_RAW)
        start = rng.randrange(0, POOL_LINES - n_full)
        first = start * B64_LINE_RAW
        if n_full == 0:
            return binascii.b2a_base64((magic + self.raw[first : first + size])[:size]).decode("ascii")
        head = binascii.b2a_base64(magic + self.raw[first + len(magic) : first + B64_LINE_RAW]).decode()
        middle = self.b64[(start + 1) * 77 : (start + n_full) * 77]
        tail = ""
        if rem:
            off = (start + n_full) * B64_LINE_RAW
            tail = binascii.b2a_base64(self.raw[off : off + rem]).decode("ascii")
        return head + middle + tail


class _FastGenerator(BytesGenerator):
    """BytesGenerator with a fast path for payloads that only use ``\n`` line ends.

    The stdlib writes every line of a payload separately (11,000 calls for a 600 kB base64
    attachment); replacing the line ends in one go gives byte-identical output.
    """

    def _write_lines(self, lines: str) -> None:
        if "\r" in lines:
            super()._write_lines(lines)  # type: ignore[misc]  # private stdlib API, not in typeshed
        elif lines:
            self.write(lines.replace("\n", self._NL))  # type: ignore[attr-defined]


def _to_bytes(msg: Message) -> bytes:
    fp = BytesIO()
    _FastGenerator(fp, mangle_from_=False, policy=WIRE_POLICY).flatten(msg)
    return fp.getvalue()


# --- helpers -----------------------------------------------------------------------------------------


def _pareto(rng: random.Random, lo: int, hi: int, alpha: float) -> int:
    """Truncated Pareto sample on [lo, hi] (inverse CDF)."""
    ratio = (lo / hi) ** alpha
    return int(lo / (1.0 - rng.random() * (1.0 - ratio)) ** (1.0 / alpha))


def _attachment_total(rng: random.Random) -> int:
    u = rng.random()
    if u < P_NO_ATTACHMENT:
        return 0
    if u < P_NO_ATTACHMENT + P_SMALL:
        return _pareto(rng, *SMALL_RANGE, SMALL_ALPHA)
    return _pareto(rng, *LARGE_RANGE, LARGE_ALPHA)


def _pick_lang(rng: random.Random) -> Lang:
    u = rng.random()
    for lang, weight in LANGS:
        if u < weight:
            return lang
        u -= weight
    return LANGS[-1][0]


def _person(rng: random.Random, lang: Lang) -> tuple[str, str]:
    if rng.random() < 0.5:
        first, last = rng.choice(lang.first_m), rng.choice(lang.last_m)
    else:
        first, last = rng.choice(lang.first_f), rng.choice(lang.last_f)
    login = f"{first}.{last}".lower().translate(_TRANSLIT)
    if rng.random() < 0.3:
        login = f"{login[0]}.{last.lower().translate(_TRANSLIT)}"
    return f"{first} {last}", login


def _addr(name: str, address: str, charset: str) -> str:
    return formataddr((name, address), charset=charset if charset != "us-ascii" else "utf-8")


def _header(value: str, charset: str) -> Header | str:
    if value.isascii():
        return value
    return Header(value, charset)


def _fill(template: str, rng: random.Random, lang: Lang) -> str:
    return template.format(
        room=rng.randint(100, 420),
        dept=rng.choice(lang.departments),
        city=rng.choice(CITIES_RU if lang is RU else CITIES),
        num=rng.randint(100, 9999),
        num2=rng.randint(1, 59),
        day=rng.randint(1, 28),
    )


def _paragraphs(rng: random.Random, lang: Lang) -> list[str]:
    return [" ".join(rng.sample(lang.sentences, rng.randint(2, 5))) for _ in range(rng.randint(2, 4))]


def _text_part(text: str, subtype: str, charset: str) -> Message:
    """A text/* leaf with the encoding real MUAs use for the charset (done in C via binascii)."""
    part = Message()
    part["Content-Type"] = f"text/{subtype}; charset={charset}" + (
        "; format=flowed" if subtype == "plain" and charset == "us-ascii" else ""
    )
    data = text.encode(charset)
    if charset in ("koi8-r", "windows-1251"):
        part["Content-Transfer-Encoding"] = "base64"
        lines = [
            binascii.b2a_base64(data[i : i + B64_LINE_RAW]).decode("ascii") for i in range(0, len(data), B64_LINE_RAW)
        ]
        part.set_payload("".join(lines))
    elif charset == "us-ascii":
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(text)
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(binascii.b2a_qp(data, istext=True).decode("ascii"))
    return part


def _html(paragraphs: Sequence[str], greeting: str, closing: str, name: str, sig: Sequence[str]) -> str:
    esc = html.escape
    body = "".join(f"<p>{esc(p)}</p>\n" for p in paragraphs)
    sig_rows = "".join(f'<tr><td style="color:#555;font-size:9pt">{esc(s)}</td></tr>\n' for s in sig)
    return (
        '<html><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8">\n'
        "<style>p{margin:0 0 8px 0} td{font-family:Calibri,Arial,sans-serif}</style></head>\n"
        '<body><div dir="ltr" style="font-family:Calibri,Arial,sans-serif;font-size:11pt">\n'
        f"<p>{esc(greeting)}</p>\n{body}<p>{esc(closing)},<br>\n<b>{esc(name)}</b></p>\n"
        f'<table cellpadding="0" cellspacing="0" border="0">\n{sig_rows}</table>\n'
        "</div></body></html>\n"
    )


def _wrap(paragraph: str, enabled: bool) -> str:
    return textwrap.fill(paragraph, 72) if enabled else paragraph


def _eu_summer_time(moment: datetime) -> bool:
    """CEST: from the last Sunday of March to the last Sunday of October, 01:00 UTC."""

    def last_sunday(month: int) -> datetime:
        day = datetime(moment.year, month, 31, 1, tzinfo=UTC)
        return day - timedelta(days=(day.weekday() - 6) % 7)

    return last_sunday(3) <= moment < last_sunday(10)


def _attachment(rng: random.Random, pool: _Pool, lang: Lang, size: int) -> Message:
    name = _fill(rng.choice(lang.files), rng, lang)
    maintype, subtype, magic = MIME_TYPES[name.rsplit(".", 1)[1].lower()]
    part = Message()
    if name.isascii():
        part["Content-Type"] = f'{maintype}/{subtype}; name="{name}"'
        part.add_header("Content-Disposition", "attachment", filename=name)
    elif rng.random() < 0.5:  # RFC 2231 (Thunderbird, Apple Mail)
        part["Content-Type"] = f"{maintype}/{subtype}"
        part.set_param("name", name, charset="utf-8")
        part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", name))
    else:  # RFC 2047 inside a quoted parameter (Outlook, Gmail) - not standard, very common
        encoded = Header(name, "utf-8").encode()
        part["Content-Type"] = f'{maintype}/{subtype}; name="{encoded}"'
        part["Content-Disposition"] = f'attachment; filename="{encoded}"'
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(pool.base64_slice(rng, size, magic))
    return part


def _multipart(subtype: str, parts: list[Message], rng: random.Random) -> Message:
    msg = Message()
    boundary = rng.choice(("----=_Part_{}_{}.{}", "_{}_{}{}_", "------------{}{}{}"))
    boundary = boundary.format(rng.getrandbits(32), rng.getrandbits(40), rng.getrandbits(24))
    msg["Content-Type"] = f'multipart/{subtype}; boundary="{boundary}"'
    payload: list[Message | str] = [*parts]
    msg.set_payload(payload)
    return msg


# --- one mail ----------------------------------------------------------------------------------------


def _build(index: int, seed: int, pool: _Pool) -> bytes:
    rng = random.Random(f"{seed}:{index}")
    lang = _pick_lang(rng)
    charset = rng.choice(lang.charsets)
    company, domain = rng.choice(lang.companies)
    name, login = _person(rng, lang)
    sender = f"{login}@{domain}"

    sent = START + timedelta(minutes=index * 7 + rng.randint(0, 6), seconds=rng.randint(0, 59))
    offset = rng.choice(lang.utc_offset)
    if lang is PL and _eu_summer_time(sent):
        offset += 1
    sent_local = sent.astimezone(timezone(timedelta(hours=offset)))

    subject = _fill(rng.choice(lang.subjects), rng, lang)
    is_reply = rng.random() < 0.25
    ticket = rng.randint(1000, 99999)
    if is_reply:
        subject = f"{'Re' if lang is not RU or rng.random() < 0.5 else 'RE'}: [#{ticket}] {subject}"

    greeting = rng.choice(lang.greetings)
    closing = rng.choice(lang.closings)
    paragraphs = _paragraphs(rng, lang)
    phone = f"{lang.phone_prefix} {rng.randint(500, 799)} {rng.randint(100, 999)} {rng.randint(100, 999)}"
    sig = (name, lang.department_label.format(rng.choice(lang.departments)), company, phone)
    wrap = charset == "us-ascii" or rng.random() < 0.4
    text = f"{greeting}\n\n" + "\n\n".join(_wrap(p, wrap) for p in paragraphs)
    text += f"\n\n{closing},\n{name}\n--\n" + "\n".join(sig[1:]) + "\n"
    if is_reply:
        earlier = format_datetime(sent_local - timedelta(hours=rng.randint(1, 72)))
        quoted = _wrap(" ".join(rng.sample(lang.sentences, 3)), True)
        text += (
            "\n" + lang.quote_intro.format(date=earlier) + "\n" + "".join(f"> {line}\n" for line in quoted.splitlines())
        )

    plain = _text_part(text, "plain", charset)
    if rng.random() < 0.45:
        html_text = _html(paragraphs, greeting, closing, name, sig[1:])
        html_cs = "utf-8" if charset == "us-ascii" else charset
        html_text = html_text.replace("charset=utf-8", f"charset={html_cs}", 1)
        body: Message = _multipart("alternative", [plain, _text_part(html_text, "html", html_cs)], rng)
    else:
        body = plain

    total = _attachment_total(rng)
    if total:
        n_files = 1 if total < 20_000 else rng.choices((1, 2, 3), (80, 15, 5))[0]
        weights = [0.25 + rng.random() for _ in range(n_files)]  # every file gets >= ~15%
        sizes = [int(total * w / sum(weights)) for w in weights]
        sizes[0] += total - sum(sizes)
        files = [_attachment(rng, pool, lang, max(size, 1)) for size in sizes]
        msg = _multipart("mixed", [body, *files], rng)
    else:
        msg = body

    # headers: set on the top-level part, in the usual order (Received first)
    top = Message()
    relay = f"mail.{domain}"
    recv = sent + timedelta(seconds=rng.randint(1, 20))
    top["Return-Path"] = f"<{sender}>"
    top["Received"] = (
        f"from {relay} ({relay} [198.51.100.{rng.randint(2, 254)}])\n"
        f"\tby mx.helpdesk.example.com (Postfix) with ESMTPS id {rng.getrandbits(48):012X}\r\n"
        f"\tfor <{HELPDESK_ADDRS[0][1]}>; {format_datetime(recv.astimezone(timezone(timedelta(hours=1))))}"
    )
    top["Received"] = (
        f"from [10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}] by {relay}\n"
        f"\twith ESMTPSA id {rng.getrandbits(40):010x}; {format_datetime(sent_local)}"
    )
    top["From"] = _addr(name, sender, charset)
    hd_name, hd_addr = rng.choice(HELPDESK_ADDRS)
    top["To"] = formataddr((hd_name, hd_addr))
    if rng.random() < 0.3:
        ccs = []
        for _ in range(rng.randint(1, 2)):
            cc_name, cc_login = _person(rng, lang)
            ccs.append(_addr(cc_name, f"{cc_login}@{domain}", charset))
        top["Cc"] = ", ".join(ccs)
    # compat32 keeps Header objects as they are, so the subject stays in the body's charset
    top["Subject"] = _header(subject, "utf-8" if charset == "us-ascii" else charset)  # type: ignore[assignment]
    top["Date"] = format_datetime(sent_local)
    top["Message-ID"] = f"<{sent:%Y%m%d%H%M%S}.{index:07d}.{seed}.{rng.getrandbits(40):010x}@{relay}>"
    if is_reply:
        ref = f"<ticket-{ticket}.{rng.getrandbits(32):08x}@helpdesk.example.com>"
        top["In-Reply-To"] = ref
        top["References"] = ref
    mailer_header, mailer = rng.choice(MAILERS)
    if mailer_header and mailer:
        top[mailer_header] = mailer
    if lang is not EN:
        top["Content-Language"] = {"pl": "pl-PL", "ru": "ru-RU"}[lang.code]
    top["MIME-Version"] = "1.0"
    for key, value in msg.items():
        top[key] = value
    top.set_payload(msg.get_payload())
    return _to_bytes(top)


# --- public API --------------------------------------------------------------------------------------


def generate(n: int, seed: int = 1) -> Iterator[bytes]:
    """Yield ``n`` raw mails (CRLF line endings), one at a time, deterministically from ``seed``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    pool = _Pool(seed)
    for index in range(1, n + 1):
        yield _build(index, seed, pool)


def write_dir(path: Path, n: int, seed: int = 1) -> GenStats:
    """Write ``n`` mails as ``path/000001.eml`` ... and return the count and total size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n)))
    total = 0
    for index, raw in enumerate(generate(n, seed), start=1):
        (path / f"{index:0{width}d}.eml").write_bytes(raw)
        total += len(raw)
    return GenStats(count=n, total_bytes=total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate realistic help-desk mails for benchmarks.")
    parser.add_argument("--count", type=int, required=True, help="number of mails to generate")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")
    started = time.perf_counter()
    stats = write_dir(args.out, args.count, args.seed)
    elapsed = time.perf_counter() - started
    print(
        f"generated {stats.count} mails in {args.out} "
        f"(average {stats.average_bytes / 1000:.1f} kB, total {stats.total_bytes / 1e6:.1f} MB, "
        f"{elapsed:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
