import codecs

from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.utils import json

# No field here takes a number longer than 19 digits. Longer ones are refused while parsing,
# below 640, the lowest limit Python's int() may be set to: its own error, which tells the
# client about sys.set_int_max_str_digits(), never reaches an answer.
MAX_INT_DIGITS = 600


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"a number has more than {MAX_INT_DIGITS} digits")
    return int(text)


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, also refusing JSON nested too deep for Python's decoder and numbers
    too long to convert (a 400 either way)."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = parsers.get_encoding(parser_context or {})
        try:
            decoded_stream = codecs.getreader(encoding)(stream)
            parse_constant = json.strict_constant if self.strict else None
            return json.load(decoded_stream, parse_constant=parse_constant, parse_int=_parse_int)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
