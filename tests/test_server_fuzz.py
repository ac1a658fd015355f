"""The OpenAPI schema the server publishes, fuzzed by schemathesis against the running server.

Bodies that fit the schema and bodies that break it: no answer is a 5xx,
every answer is one the schema documents (status, content type, body), and
so every error is OpenAI's error object. Left out: the check that every body
fitting the schema is accepted. Some are refused by design, with a 400 that
names the field, as OpenAI refuses them: an unknown model, `top_logprobs`
without `logprobs`, two user turns in a row, more tokens than the server's
limit.
"""

import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from test_server import default, serving  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fuzzed_server(default):  # noqa: F811
    # Short answers and prompts, so that the bodies that are accepted run quickly.
    with serving(default, max_tokens=4, max_prompt_tokens=64) as (url, app):
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    schema = schemathesis.openapi.from_url(fuzzed_server + "/openapi.json")
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_the_published_schema_holds_for_any_body(case, fuzzed_server):
    case.call_and_validate(base_url=fuzzed_server, excluded_checks=[positive_data_acceptance])
