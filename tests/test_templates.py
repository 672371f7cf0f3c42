"""Templates: lookup by tier, kind and locale; the sandbox; validation against columns."""

from __future__ import annotations

import pytest

from herald.core.errors import ValidationFailed
from herald.delivery.render import RenderError, templates_for
from herald.flows.validate import check_flow

VARS = {"id": 4, "name": "Li Lei", "email": "a@example.com", "phone": "+14155550004",
        "tier": "gold", "locale": "zh_CN", "score": 4, "flow": "promo", "run_key": "k",
        "channel": "email"}


def test_tier_locale_and_default_fallbacks(make_workspace) -> None:
    ws = make_workspace()
    t = templates_for(ws)
    flow = ws.flow("promo")
    zh = t.render(flow, "gold", "email", "zh_CN", VARS)
    assert zh.subject == "Li Lei，送您一份礼物"
    assert zh.body == "亲爱的Li Lei，金卡会员专享。"
    assert zh.html == "<p>Hello <b>Li Lei</b></p>"  # no gold html: the default tier's
    en = t.render(flow, "gold", "email", "en_US", VARS)
    assert en.subject == "A gift for you, Li Lei"
    other = t.render(flow, "default", "sms", None, VARS)
    assert other.body == "Hi Li Lei, score 4. Reply STOP to opt out"
    assert other.subject is None


def test_assignments_and_globals_stay_in_their_part(make_workspace) -> None:
    """A name a part assigns ({% set %}, a loop) shadows the recipient's value in that
    part only: the next part and the next recipient read the row as it is; Jinja's own
    globals (range, namespace) are there in every part, and a column of the same name
    wins over a global, as in jinja2's own render."""
    ws = make_workspace({
        "templates/promo/default.email.subject.j2":
            "{% set name = 'Shadowed' %}{{ name }}{% for i in range(2) %}{{ i }}{% endfor %}",
        "templates/promo/default.email.txt.j2":
            "{% set ns = namespace(n=0) %}{% for c in name %}{% set ns.n = ns.n + 1 %}"
            "{% endfor %}{{ name }} {{ ns.n }} {{ lipsum }}",
    })
    t = templates_for(ws)
    variables = {**VARS, "lipsum": "column"}
    first = t.render(ws.flow("promo"), "default", "email", None, variables)
    assert (first.subject, first.body) == ("Shadowed01", "Li Lei 6 column")
    second = t.render(ws.flow("promo"), "default", "email", None, {**variables, "name": "Bo"})
    assert (second.subject, second.body) == ("Shadowed01", "Bo 2 column")
    assert variables["name"] == "Li Lei" and "ns" not in variables


def test_html_is_autoescaped_text_is_not(make_workspace) -> None:
    ws = make_workspace()
    t = templates_for(ws)
    evil = {**VARS, "name": "<script>x</script>&"}
    rendered = t.render(ws.flow("promo"), "default", "email", None, evil)
    assert rendered.html == "<p>Hello <b>&lt;script&gt;x&lt;/script&gt;&amp;</b></p>"
    assert rendered.body.startswith("Hello <script>x</script>&,")


def test_strict_undefined_is_a_render_error(make_workspace) -> None:
    ws = make_workspace()
    t = templates_for(ws)
    missing = {k: v for k, v in VARS.items() if k != "score"}
    with pytest.raises(RenderError,
                       match=r"templates/promo/default.sms.txt.j2:1: 'score' is undefined"):
        t.render(ws.flow("promo"), "default", "sms", None, missing)


def test_a_null_column_renders_empty_and_default_can_replace_it(make_workspace) -> None:
    ws = make_workspace({
        "templates/promo/default.email.subject.j2": "Hello {{ name }}!",
        "templates/promo/default.email.txt.j2": "Dear {{ name | default('there', true) }},",
        "templates/promo/default.email.html.j2": "<p>{{ name }}|{{ score }}</p>"})
    t = templates_for(ws)
    rendered = t.render(ws.flow("promo"), "default", "email", None,
                        {**VARS, "name": None, "score": 0})
    assert (rendered.subject, rendered.body) == ("Hello !", "Dear there,")
    assert rendered.html == "<p>|0</p>"  # a zero is a value, not a NULL
    missing = {k: v for k, v in VARS.items() if k != "name"}
    with pytest.raises(RenderError, match="'name' is undefined"):
        t.render(ws.flow("promo"), "default", "email", None, missing)


def test_sandbox_blocks_escapes(make_workspace) -> None:
    ws = make_workspace({"templates/promo/default.sms.txt.j2":
                         "{{ name.__class__.__mro__[1].__subclasses__() }}"})
    t = templates_for(ws)
    with pytest.raises(RenderError, match=r"sandbox|unsafe|__class__"):
        t.render(ws.flow("promo"), "default", "sms", None, VARS)
    with pytest.raises(ValidationFailed, match=r"access to '__class__' is not allowed"):
        check_flow(ws, "promo")


def test_validate_names_template_line_and_unknown_column(make_workspace) -> None:
    ws = make_workspace({"templates/promo/gold.email.txt.zh.j2":
                         "亲爱的{{ name }}\n您的积分：{{ points }}\n"})
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    (problem,) = exc.value.problems
    assert problem.file == "templates/promo/gold.email.txt.zh.j2"
    assert problem.line == 2
    assert "uses 'points', which the segment does not return" in problem.message


def test_validate_syntax_error_and_missing_required_part(make_workspace) -> None:
    ws = make_workspace({"templates/promo/default.sms.txt.j2": "Hi {{ name }\n",
                         "templates/promo/default.email.subject.j2": None})
    (ws.root / "templates/promo/default.email.subject.j2").unlink(missing_ok=True)
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    text = str(exc.value)
    assert "templates/promo/default.sms.txt.j2:1: syntax error" in text
    assert ("no email subject template for tier 'default': create "
            "templates/promo/default.email.subject.j2") in text



def test_validate_refuses_an_empty_message_template(make_workspace) -> None:
    """An empty (or only white space) file in a message's place would fail every send
    that renders it: validate names it; an empty partial that a template includes is
    harmless and passes."""
    ws = make_workspace({"templates/promo/gold.sms.txt.j2": "  \n\n",
                         "templates/promo/default.email.subject.j2": "",
                         "templates/promo/default.email.txt.j2":
                             "Hi {{ name }}{% include 'promo/footer.j2' %}\n",
                         "templates/promo/footer.j2": ""})
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    assert sorted((p.file, p.message.split(":")[0]) for p in exc.value.problems) == [
        ("templates/promo/default.email.subject.j2", "empty"),
        ("templates/promo/gold.sms.txt.j2", "empty")]
    assert "every sms text rendered from it would be empty" in str(exc.value)


@pytest.mark.parametrize(("source", "said"), [
    ("Hi {{ name | shout }}\n", "No filter named 'shout'"),
    ("Hi\n{% if score > 1 %}{{ name | shout }}{% endif %}\n", "No filter named 'shout'"),
    ("Hi\n{% if name is shouted %}!{% endif %}\n", "No test named 'shouted'"),
], ids=["filter", "filter in an if", "test"])
def test_validate_names_an_unknown_filter_or_test(make_workspace, source, said) -> None:
    """One problem with its line, no traceback (the check of the variables a template
    uses made Jinja raise on the first), and also inside an `if`, where Jinja refuses
    them only when the branch renders (a render error per recipient)."""
    ws = make_workspace({"templates/promo/default.sms.txt.j2": source})
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    (problem,) = exc.value.problems
    assert (problem.file, problem.line) == ("templates/promo/default.sms.txt.j2",
                                            1 if source.startswith("Hi {{") else 2)
    assert problem.message == f"syntax error: {said}."

def test_validate_checks_columns_the_flow_needs(make_workspace) -> None:
    ws = make_workspace({"audiences/people.sql":
                         "SELECT id, name, email, tier, locale, score FROM people "
                         "WHERE score >= :min_score"})
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    assert [str(p) for p in exc.value.problems] == [
        "config/flows/promo.yaml:11 tiers.gold.channels[1]: channel 'sms' sends to column "
        "'phone', which audiences/people.sql does not return",
        "config/flows/promo.yaml:12 tiers.default.channels[0]: channel 'sms' sends to column "
        "'phone', which audiences/people.sql does not return",
    ]


def test_a_valid_flow_passes(make_workspace) -> None:
    ws = make_workspace()
    checked = check_flow(ws, "promo")
    assert checked.columns == ["id", "name", "email", "phone", "tier", "locale", "score"]
    assert checked.templates == 8  # every file under templates/promo/


def test_a_byte_order_mark_is_not_sent(make_workspace) -> None:
    """Some editors start a UTF-8 file with U+FEFF; it is not part of the message."""
    ws = make_workspace({"templates/promo/gold.email.subject.j2": "\ufeffA gift, {{ name }}",
                         "templates/promo/gold.email.txt.j2": "\ufeffDear {{ name }}."})
    check_flow(ws, "promo")
    rendered = templates_for(ws).render(ws.flow("promo"), "gold", "email", None, VARS)
    assert rendered.subject == "A gift, Li Lei"
    assert rendered.body == "Dear Li Lei."


def test_a_template_linked_to_a_file_outside_templates_is_refused(make_workspace,
                                                                   tmp_path) -> None:
    """A link out of templates/ would put any file Herald can read into messages; it is
    refused like an include that climbs out."""
    outside = tmp_path / "elsewhere.j2"
    outside.write_text("OUTSIDE {{ name }}", encoding="utf-8")
    ws = make_workspace()
    linked = ws.root / "templates/promo/gold.email.txt.j2"
    linked.unlink()
    linked.symlink_to(outside)
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    assert [str(p) for p in exc.value.problems] == [
        "templates/promo/gold.email.txt.j2: is a link to a file outside templates/ "
        "(templates are read only from there)"]
    with pytest.raises(RenderError, match="outside templates/"):  # and a run never reads it
        templates_for(ws).render(ws.flow("promo"), "gold", "email", None, VARS)


def test_a_link_inside_templates_is_followed(make_workspace) -> None:
    ws = make_workspace()
    linked = ws.root / "templates/promo/gold.email.txt.j2"
    linked.unlink()
    linked.symlink_to(ws.root / "templates/promo/default.email.txt.j2")
    check_flow(ws, "promo")
    rendered = templates_for(ws).render(ws.flow("promo"), "gold", "email", None, VARS)
    assert rendered.body == "Hello Li Lei, your score is 4."
