import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.checkout.templates import (
    MissingValue,
    RenderContext,
    StepView,
    TemplateError,
    UnsafePathValue,
    compile_path,
    compile_template,
)

WHERE = "checkout.steps.payment.request.body"


def context(
    body: Any = None,
    headers: dict[str, str] | None = None,
    steps: dict[str, StepView] | None = None,
) -> RenderContext:
    return RenderContext(
        request_body=body,
        request_headers=headers or {},
        steps=steps or {},
        checkout_id="co_123",
        idempotency_key="key-1",
    )


def render(template: Any, ctx: RenderContext) -> Any:
    return compile_template(template, where=WHERE).render(ctx)


def render_path(path: str, ctx: RenderContext) -> str:
    return compile_path(path, "checkout.steps.payment.request.path").render(ctx)


# --- an exact placeholder keeps the value's JSON type ----------------------------------


@pytest.mark.parametrize(
    "value",
    [42, 1.5, [1, "two", {"three": 3}], {"a": {"b": [1]}}, None, True, False, "text"],
    ids=["int", "float", "list", "dict", "null", "true", "false", "string"],
)
def test_exact_placeholder_keeps_the_json_type(value: Any) -> None:
    rendered = render("{{request.body.x}}", context({"x": value}))
    assert rendered == value
    assert type(rendered) is type(value)


def test_whitespace_inside_braces_is_allowed() -> None:
    assert render("{{  request.body.x\t}}", context({"x": 3})) == 3


def test_whole_request_body_is_a_placeholder() -> None:
    assert render("{{request.body}}", context([1, 2])) == [1, 2]


def test_checkout_id_and_idempotency_key() -> None:
    assert render(["{{checkout.id}}", "{{ idempotency_key }}"], context()) == ["co_123", "key-1"]


# --- inside a longer string a value is text ---------------------------------------------


def test_string_value_is_interpolated_raw() -> None:
    assert render("order for {{request.body.name}}!", context({"name": 'Zoë "Z"'})) == (
        'order for Zoë "Z"!'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [(7, "7"), (2.5, "2.5"), (True, "true"), (False, "false"), (None, "null")],
)
def test_scalar_is_interpolated_as_json_text(value: Any, text: str) -> None:
    assert render("v={{request.body.x}}", context({"x": value})) == f"v={text}"


def test_dict_and_list_are_interpolated_as_compact_json_text() -> None:
    ctx = context({"d": {"a": [1, "é"]}, "l": [True, None]})
    assert render("{{request.body.d}} {{request.body.l}}", ctx) == '{"a":[1,"é"]} [true,null]'


def test_adjacent_placeholders_are_concatenated() -> None:
    assert render("{{checkout.id}}{{idempotency_key}}", context()) == "co_123key-1"


def test_lone_braces_are_literal_text() -> None:
    assert render("a } b }} c { d", context()) == "a } b }} c { d"


# --- paths are percent-encoded ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("a/b", "a%2Fb"),
        ("two words", "two%20words"),
        ("zoë→", "zo%C3%AB%E2%86%92"),
        ("x?admin=1", "x%3Fadmin%3D1"),
        ("frag#1", "frag%231"),
        ("100%", "100%25"),
        ("safe-._~AZaz09", "safe-._~AZaz09"),
        (12, "12"),
    ],
)
def test_path_value_is_percent_encoded(value: Any, encoded: str) -> None:
    assert render_path("/orders/{{request.body.id}}/capture", context({"id": value})) == (
        f"/orders/{encoded}/capture"
    )


def test_path_literal_text_is_left_as_written() -> None:
    path = "/v1/quote?zip={{request.body.zip}}&id={{checkout.id}}"
    assert render_path(path, context({"zip": "1 2"})) == "/v1/quote?zip=1%202&id=co_123"


def test_path_exact_placeholder_is_text_not_a_value() -> None:
    assert render_path("{{request.body.n}}", context({"n": 5})) == "5"


@pytest.mark.parametrize("value", ["..", ".", ""])
def test_path_value_that_would_be_a_dot_or_empty_segment_is_refused(value: str) -> None:
    with pytest.raises(UnsafePathValue) as caught:
        render_path("/orders/{{request.body.id}}/void", context({"id": value}))
    assert caught.value.placeholder == "{{request.body.id}}"
    assert caught.value.source == "request"


def test_two_placeholders_making_a_dot_dot_segment_are_refused() -> None:
    with pytest.raises(UnsafePathValue):
        render_path("/o/{{request.body.a}}{{request.body.b}}", context({"a": ".", "b": "."}))


def test_dots_within_a_longer_segment_are_allowed() -> None:
    assert render_path("/files/{{request.body.id}}.json", context({"id": ".."})) == (
        "/files/...json"
    )


def test_dots_in_the_query_are_allowed() -> None:
    assert render_path("/quote?ref={{request.body.id}}", context({"id": ".."})) == "/quote?ref=.."


def test_compile_path_rejects_a_non_string() -> None:
    with pytest.raises(TemplateError, match="a path must be a string"):
        compile_path(["/x"], "steps.payment.path")  # type: ignore[arg-type]


# --- nested templates ------------------------------------------------------------------


def test_nested_dicts_and_lists_are_rendered_throughout() -> None:
    template = {
        "amount": "{{request.body.total}}",
        "meta": {"checkout": "{{checkout.id}}", "tags": ["fixed", "c-{{request.body.c}}"]},
        "lines": [{"sku": "{{request.body.items.0.sku}}", "qty": 1}],
        "constant": [1, 2.5, True, None],
    }
    ctx = context({"total": 1999, "c": "x", "items": [{"sku": "A1"}]})
    assert render(template, ctx) == {
        "amount": 1999,
        "meta": {"checkout": "co_123", "tags": ["fixed", "c-x"]},
        "lines": [{"sku": "A1", "qty": 1}],
        "constant": [1, 2.5, True, None],
    }


def test_each_render_builds_fresh_containers() -> None:
    template = compile_template({"a": ["x"]}, where=WHERE)
    first = template.render(context())
    first["a"].append("mutated")
    assert template.render(context()) == {"a": ["x"]}


def test_placeholder_in_a_dict_key_is_a_compile_error() -> None:
    with pytest.raises(TemplateError, match="not in keys"):
        compile_template({"{{request.body.k}}": 1}, where=WHERE)


def test_non_json_value_is_a_compile_error() -> None:
    with pytest.raises(TemplateError, match=r"set is not a JSON value"):
        compile_template({"a": {1, 2}}, where=WHERE)


# --- headers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-customer", "X-Customer", "X-CUSTOMER"])
def test_request_header_lookup_is_case_insensitive(name: str) -> None:
    ctx = context(headers={"x-cUsToMeR": "cust_9"})
    assert render(f"{{{{request.headers.{name}}}}}", ctx) == "cust_9"


def test_request_headers_from_aiohttp_multidict() -> None:
    headers = CIMultiDictProxy(CIMultiDict([("X-Customer", "first"), ("x-customer", "second")]))
    ctx = RenderContext(None, headers, {}, "co", "k")
    assert render("{{request.headers.x-customer}}", ctx) == "first"


def test_step_header_lookup_is_case_insensitive() -> None:
    ctx = context(steps={"payment": StepView(201, {}, {"Location": "/auth/1"})})
    assert render("{{steps.payment.headers.location}}", ctx) == "/auth/1"


# --- steps ----------------------------------------------------------------------------


def test_step_body_and_status_are_read() -> None:
    ctx = context(steps={"payment": StepView(status=201, body={"id": "auth_1"})})
    template = {"auth": "{{steps.payment.body.id}}", "status": "{{steps.payment.status}}"}
    assert render(template, ctx) == {"auth": "auth_1", "status": 201}


def test_step_refs_lists_every_referenced_step_once() -> None:
    template = compile_template(
        {
            "a": "{{steps.payment.body.id}}",
            "b": ["{{steps.inventory.status}}", "x {{steps.payment.headers.etag}}"],
            "c": "{{request.body.items}}",
        },
        where=WHERE,
    )
    assert template.step_refs() == {"payment", "inventory"}


def test_step_refs_of_a_path() -> None:
    assert compile_path("/v/{{steps.payment.body.id}}", "p").step_refs() == {"payment"}


def test_step_refs_is_empty_without_step_placeholders() -> None:
    assert compile_template({"a": "{{request.body}}", "b": 1}, where=WHERE).step_refs() == set()


def test_placeholders_are_listed_canonically_in_order() -> None:
    template = compile_template(["{{ checkout.id }}", "{{steps.p.status}}"], where=WHERE)
    assert template.placeholders() == ("{{checkout.id}}", "{{steps.p.status}}")


# --- list indexes -----------------------------------------------------------------------


def test_list_index_lookup() -> None:
    ctx = context({"items": [{"sku": "A"}, {"sku": "B"}]})
    assert render("{{request.body.items.1.sku}}", ctx) == "B"


def test_digit_segment_is_a_string_key_on_an_object() -> None:
    assert render("{{request.body.codes.0}}", context({"codes": {"0": "zero"}})) == "zero"


# --- missing values name the placeholder and whose fault it is ----------------------


def test_missing_body_key_names_the_placeholder_and_the_request() -> None:
    with pytest.raises(MissingValue) as caught:
        render({"x": "{{ request.body.items }}"}, context({"other": 1}))
    assert str(caught.value) == (
        "placeholder {{request.body.items}} has no value: request.body has no key 'items'"
    )
    assert caught.value.source == "request"
    assert caught.value.placeholder == "{{request.body.items}}"
    assert caught.value.where == f"{WHERE}.x"


def test_missing_list_index_says_the_length() -> None:
    with pytest.raises(MissingValue, match=r"request.body.items has no index 2 \(length 1\)"):
        render("{{request.body.items.2}}", context({"items": [1]}))


def test_non_numeric_index_into_a_list_is_missing() -> None:
    with pytest.raises(
        MissingValue, match=re.escape("request.body.items is an array, '-1' is not an index")
    ):
        render("{{request.body.items.-1}}", context({"items": [1]}))


def test_key_into_a_scalar_is_missing() -> None:
    with pytest.raises(
        MissingValue, match=re.escape("request.body.total is a number, it has no key 'x'")
    ):
        render("{{request.body.total.x}}", context({"total": 5}))


def test_key_into_an_absent_body_is_missing() -> None:
    with pytest.raises(MissingValue, match=re.escape("request.body is null, it has no key 'x'")):
        render("{{request.body.x}}", context(None))


def test_missing_header_names_the_header() -> None:
    with pytest.raises(MissingValue, match="request has no header 'x-customer'") as caught:
        render("{{request.headers.X-Customer}}", context())
    assert caught.value.source == "request"


def test_missing_step_body_key_is_the_steps_fault() -> None:
    ctx = context(steps={"payment": StepView(500, {"error": "boom"})})
    with pytest.raises(MissingValue) as caught:
        render("auth {{steps.payment.body.id}}", ctx)
    assert caught.value.source == "steps"
    assert str(caught.value) == (
        "placeholder {{steps.payment.body.id}} has no value: steps.payment.body has no key 'id'"
    )


def test_step_that_has_not_run_is_missing() -> None:
    with pytest.raises(MissingValue, match="step 'payment' has not run") as caught:
        render("{{steps.payment.status}}", context())
    assert caught.value.source == "steps"


# --- the step being rendered: {{step.key}}, {{step.name}} ----------------------------------


def test_step_key_renders_the_key_the_context_was_given_for_the_step() -> None:
    ctx = context().for_step("payment", "key-1:payment")

    assert render("{{step.key}}", ctx) == "key-1:payment"
    assert render("{{step.name}}", ctx) == "payment"
    assert render({"ref": "{{step.name}}/{{step.key}}"}, ctx) == {"ref": "payment/key-1:payment"}


def test_step_key_in_a_query_is_percent_encoded_and_adds_no_parameter() -> None:
    ctx = context().for_step("payment", "k&x=1:payment")

    rendered = render_path("/authorizations?idempotency_key={{step.key}}", ctx)

    assert rendered == "/authorizations?idempotency_key=k%26x%3D1%3Apayment"


def test_step_key_outside_a_steps_own_call_is_missing_not_guessed() -> None:
    with pytest.raises(MissingValue, match="only a step's own calls") as caught:
        render("{{step.key}}", context())
    assert caught.value.source == "steps"


def test_for_step_keeps_everything_else_and_survives_with_step() -> None:
    base = context({"amount": 5}, steps={"inventory": StepView(201, {"id": "res_1"})})

    ctx = base.for_step("payment", "key-1:payment").with_step("payment", 200, {"id": "a"})

    assert render("{{step.key}}", ctx) == "key-1:payment"
    assert render("{{steps.payment.body.id}}", ctx) == "a"
    assert render("{{steps.inventory.body.id}}", ctx) == "res_1"
    assert render("{{request.body.amount}}", ctx) == 5
    assert base.step is None


def test_template_says_whether_it_reads_its_own_step() -> None:
    assert compile_path("/a?k={{step.key}}", "x").reads_own_step()
    assert not compile_template({"id": "{{steps.payment.body.id}}"}, where="x").reads_own_step()
    assert compile_template({"id": "{{step.key}}"}, where="x").step_refs() == set()


# --- compile errors ---------------------------------------------------------------------


def test_unknown_root_is_a_compile_error_naming_where_and_placeholder() -> None:
    with pytest.raises(TemplateError) as caught:
        compile_template({"amount": "{{reqest.body.total}}"}, where=WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}.amount: ")
    assert "{{reqest.body.total}}" in message
    assert "unknown root 'reqest'" in message
    assert caught.value.where == f"{WHERE}.amount"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{{}}", "it is empty"),
        ("{{   }}", "it is empty"),
        ("id {{request.body.id", "unclosed placeholder"),
        ("{{request.body.a b}}", "malformed placeholder"),
        ("{{request.body..a}}", "malformed placeholder"),
        ("{{.request.body}}", "malformed placeholder"),
        ("{{request.body.a.}}", "malformed placeholder"),
        ("{{request.body[0]}}", "malformed placeholder"),
        ("{{ {{request.body}} }}", "malformed placeholder"),
        ("{{request.body.x | upper}}", "malformed placeholder"),
    ],
)
def test_malformed_placeholder_is_a_compile_error(text: str, complaint: str) -> None:
    with pytest.raises(TemplateError, match=complaint) as caught:
        compile_template(text, where=WHERE)
    assert str(caught.value).startswith(f"{WHERE}: ")


@pytest.mark.parametrize(
    "text",
    [
        "{{request}}",
        "{{request.query.x}}",
        "{{request.headers}}",
        "{{request.headers.a.b}}",
        "{{steps}}",
        "{{steps.payment}}",
        "{{steps.payment.latency}}",
        "{{checkout}}",
        "{{checkout.total}}",
        "{{idempotency_key.x}}",
        "{{step}}",
        "{{step.id}}",
        "{{step.key.x}}",
        "{{step.body}}",
    ],
)
def test_placeholder_with_a_known_root_but_wrong_shape_is_a_compile_error(text: str) -> None:
    with pytest.raises(TemplateError, match="must be"):
        compile_template(text, where=WHERE)


def test_compile_error_in_a_nested_list_names_the_index() -> None:
    with pytest.raises(TemplateError, match=r"^checkout\.body\.lines\[1\]\.sku: "):
        compile_template({"lines": [{}, {"sku": "{{nope}}"}]}, where="checkout.body")


# --- nothing can execute ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{{__import__('os').system('true')}}",
        "{{request.body.x()}}",
        "{{ request.body['x'] }}",
        "{{1+1}}",
        "{{request.body.x if True else 0}}",
        "{% for x in y %}{{x}}{% endfor %}",
    ],
)
def test_code_in_a_placeholder_is_refused_at_compile(text: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(text, where=WHERE)


@pytest.mark.parametrize("name", ["__class__", "__dict__", "keys", "items", "__len__"])
def test_attribute_names_are_only_dict_keys(name: str) -> None:
    with pytest.raises(MissingValue, match=re.escape(f"request.body has no key '{name}'")):
        render(f"{{{{request.body.{name}}}}}", context({"x": 1}))


def test_attribute_name_that_is_a_key_returns_the_key_value() -> None:
    assert render("{{request.body.__class__}}", context({"__class__": "data"})) == "data"


def test_string_methods_are_not_reachable() -> None:
    with pytest.raises(MissingValue, match="is a string, it has no key 'upper'"):
        render("{{request.body.name.upper}}", context({"name": "x"}))


# --- properties -------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text().filter(lambda s: "{{" not in s)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text().filter(lambda s: "{{" not in s), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_template_without_placeholders_renders_an_equal_value(value: Any) -> None:
    assert compile_template(value, where=WHERE).render(context()) == value


@given(json_values)
def test_any_json_value_in_the_body_comes_back_identical(value: Any) -> None:
    rendered = render({"wrapped": "{{request.body.x}}"}, context({"x": value}))
    assert rendered == {"wrapped": value}
    assert rendered["wrapped"] is value


@given(st.text())
def test_text_in_a_path_never_adds_segments_or_a_query(value: str) -> None:
    ctx = context({"v": "seg-" + value})
    path = render_path("/a/{{request.body.v}}/b", ctx)
    assert path.count("/") == 3
    assert "?" not in path
    assert "#" not in path
