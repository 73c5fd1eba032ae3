"""Synthetic conversations in Gemma 4's format, rendered through the package's chat template.

A document is exactly what the model sees at inference: the prompt as the template renders it with the
generation prompt (so thinking-off turns start after the empty thought block), then the model's turn as the
template renders it (thought channel, tool calls, tool results folded into the same turn, `<turn|>`).
Everything is drawn from one `random.Random`, so a seed gives the same documents on any machine.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import demo_tasks as tasks
from demo_corpus import DocFact

from nvfp4kit.prompting.chat_template import ChatTemplate

TEMPLATE_FILE = Path(__file__).resolve().parent.parent / "src" / "nvfp4kit" / "assets" / "chat_template.jinja"

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.", "Be brief.",
                  "You are a friendly assistant.", "Answer the user's question.")  # fmt: skip
CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lagos", "Nairobi", "Lima", "Oslo",
          "Seoul", "Delhi", "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Mexico City", "Buenos Aires",
          "Istanbul", "Athens", "Vienna", "Prague", "Warsaw", "Dublin", "Lisbon", "Helsinki", "Bangkok", "Hanoi",
          "Manila", "Jakarta", "Santiago", "Bogota", "Accra", "Dakar", "Zurich", "Munich", "Osaka", "Seattle",
          "Austin", "Miami", "Reykjavik", "Cape Town", "Singapore", "Dubai", "Montreal", "Auckland")  # fmt: skip
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy", "partly cloudy")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
        "required": ["city"]}}}  # fmt: skip
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "description": "The expression, e.g. 12 * (3 + 4)"}},
        "required": ["expression"]}}}  # fmt: skip
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}  # fmt: skip
ALL_TOOLS = (WEATHER_TOOL, CALCULATOR_TOOL, TIME_TOOL)

IDENTITY = ("I am a small demo language model with the Gemma 4 architecture, trained for nvfp4kit. I can chat, "
            "do simple arithmetic step by step, answer questions about the Python standard library, and call "
            "tools.")  # fmt: skip
NVFP4 = ("NVFP4 is a 4-bit floating-point format. Each weight is an E2M1 number, every block of 16 weights shares "
         "an FP8 E4M3 scale, and the whole tensor has one FP32 scale.")  # fmt: skip
SMALL_TALK = (
    (("Hi", "Hello", "Hello!", "Hey there", "Good morning", "Hi there!", "Hey"),
     ("Hello! How can I help you today?", "Hi! What can I do for you?", "Hello! What would you like to know?")),
    (("Who are you?", "What are you?", "What is your name?", "Tell me about yourself."), (IDENTITY,)),
    (("What can you do?", "How can you help me?"), (IDENTITY,)),
    (("What is NVFP4?", "Explain NVFP4.", "What does NVFP4 mean?"), (NVFP4,)),
    (("Thank you!", "Thanks", "Thanks a lot!", "Great, thank you."), ("You're welcome!", "Happy to help!")),
    (("Bye", "Goodbye!", "See you later."), ("Goodbye! Have a nice day.", "Bye! Take care.")),
    (("How are you?", "How are you doing?"), ("I'm doing well, thank you! How can I help you?",)),
)  # fmt: skip


def _call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _assistant(content: str = "", reasoning: str | None = None, calls: list | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


class ChatFactory:
    """Draws whole conversations; `document()` returns one rendered training document."""

    def __init__(self, rng: random.Random, facts: list[DocFact], words: list[str]):
        self.rng = rng
        self.facts = facts
        self.words = words
        self.template = ChatTemplate(TEMPLATE_FILE.read_text(), {"bos_token": "<bos>"})
        self.kinds = (
            (self.task_chat, 40), (self.fact_chat, 14), (self.small_talk, 8), (self.multi_turn, 10),
            (self.weather, 12), (self.calculator, 7), (self.clock, 4), (self.two_cities, 3),
            (self.tools_unused, 4),
        )  # fmt: skip

    # ---- rendering ----------------------------------------------------------------------------------
    def render(self, history, steps, *, tools=None, thinking: bool) -> str:
        """The prompt for `history` (ending with a user turn) followed by the model's turn `steps`."""
        kwargs = {"enable_thinking": thinking}
        base = self.template.render(history, tools=tools, add_generation_prompt=False, template_kwargs=kwargs)
        full = self.template.render(
            history + steps, tools=tools, add_generation_prompt=False, template_kwargs=kwargs
        )
        opener = "<|turn>model\n"
        if not full.startswith(base + opener):
            raise AssertionError("the model turn does not extend the prompt")
        body = full[len(base) + len(opener) :]
        # Mostly the live prompt (empty thought block when thinking is off); sometimes the re-rendered
        # history form a server sends on the next tool step, which has no empty block.
        if steps[0].get("tool_calls") and not thinking and self.rng.random() < 0.5:
            return base + opener + body
        prompt = self.template.render(
            history, tools=tools, add_generation_prompt=True, template_kwargs=kwargs
        )
        return prompt + body

    def _opening(self) -> list[dict[str, Any]]:
        if self.rng.random() < 0.4:
            return [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)}]
        return []

    def document(self) -> str:
        kinds, weights = zip(*self.kinds)
        return self.rng.choices(kinds, weights=weights)[0]()

    # ---- answer-only conversations ---------------------------------------------------------------
    def _task(self) -> tasks.Task:
        pick = self.rng.random()
        if pick < 0.4:
            return tasks.arithmetic(self.rng)
        if pick < 0.55:
            return tasks.word_problem(self.rng)
        if pick < 0.8:
            return tasks.letters(self.rng, self.words)
        return tasks.numbers(self.rng)

    def _fact(self) -> tasks.Task:
        fact = self.rng.choice(self.facts)
        module, _, name = fact.qualname.rpartition(".")
        kind = self.rng.randrange(3)
        if kind == 0:
            q = self.rng.choice(("What does {q} do?", "What is {q} in Python?", "Explain the Python function {q}.",
                                 "What does `{q}` do?"))  # fmt: skip
            r = f"{fact.qualname} is {name} from the {module} module of the Python standard library."
            return q.format(q=fact.qualname), r, f"`{fact.qualname}({fact.signature})`: {fact.summary}"
        if kind == 1:
            q = f"Which module of the Python standard library has {name}, the one described as: {fact.summary}"
            r = f"That description belongs to {fact.qualname}, so the module is {module}."
            return q, r, f"It is in the `{module}` module: `{fact.qualname}`."
        q = f"How do I call {fact.qualname}?"
        r = f"{fact.qualname} takes the arguments ({fact.signature})."
        return q, r, f"Call it as `{fact.qualname}({fact.signature})`. {fact.summary}"

    def _answer_steps(self, task: tasks.Task, thinking: bool) -> list[dict[str, Any]]:
        _, reasoning, answer = task
        return [_assistant(answer, reasoning if thinking else None)]

    def task_chat(self) -> str:
        thinking = self.rng.random() < 0.5
        task = self._task()
        history = self._opening() + [{"role": "user", "content": task[0]}]
        return self.render(history, self._answer_steps(task, thinking), thinking=thinking)

    def fact_chat(self) -> str:
        thinking = self.rng.random() < 0.5
        task = self._fact()
        history = self._opening() + [{"role": "user", "content": task[0]}]
        return self.render(history, self._answer_steps(task, thinking), thinking=thinking)

    def _small_talk(self) -> tasks.Task:
        questions, answers = self.rng.choice(SMALL_TALK)
        question = self.rng.choice(questions)
        return question, f"The user said '{question}'. Reply politely.", self.rng.choice(answers)

    def small_talk(self) -> str:
        thinking = self.rng.random() < 0.5
        task = self._small_talk()
        history = self._opening() + [{"role": "user", "content": task[0]}]
        return self.render(history, self._answer_steps(task, thinking), thinking=thinking)

    def multi_turn(self) -> str:
        thinking = self.rng.random() < 0.5
        history = self._opening()
        for _ in range(self.rng.randint(1, 2)):  # earlier turns keep only their answers
            q, _, a = self.rng.choice((self._task, self._fact, self._small_talk))()
            history += [{"role": "user", "content": q}, _assistant(a)]
        task = self.rng.choice((self._task, self._fact, self._small_talk))()
        history.append({"role": "user", "content": task[0]})
        return self.render(history, self._answer_steps(task, thinking), thinking=thinking)

    # ---- tool use -------------------------------------------------------------------------------
    def _tools(self, needed: dict[str, Any]) -> list[dict[str, Any]]:
        others = [t for t in ALL_TOOLS if t is not needed and self.rng.random() < 0.5]
        chosen = [needed, *others]
        self.rng.shuffle(chosen)
        return chosen

    def _tool_chat(
        self, tool, question: str, calls: list, results: list, reasons: tuple[str, str], answer: str
    ):
        thinking = self.rng.random() < 0.5
        history = self._opening() + [{"role": "user", "content": question}]
        steps = [_assistant("", reasons[0] if thinking else None, calls)]
        for call, result in zip(calls, results):
            steps.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        steps.append(_assistant(answer, reasons[1] if thinking else None))
        return self.render(history, steps, tools=self._tools(tool), thinking=thinking)

    def _weather_report(self, city: str, fahrenheit: bool) -> tuple[dict[str, Any], str]:
        celsius = self.rng.randint(-15, 38)
        temp = round(celsius * 9 / 5 + 32) if fahrenheit else celsius
        unit = "fahrenheit" if fahrenheit else "celsius"
        condition = self.rng.choice(CONDITIONS)
        return {
            "temperature": temp,
            "unit": unit,
            "condition": condition,
        }, f"{temp}°{'F' if fahrenheit else 'C'}"

    def weather(self) -> str:
        city = self.rng.choice(CITIES)
        fahrenheit = self.rng.random() < 0.25
        q = self.rng.choice(("What's the weather in {c}?", "What is the weather like in {c} today?",
                             "Is it raining in {c}?", "How warm is it in {c}?", "Weather in {c}, please.",
                             "Should I take a coat in {c} today?"))  # fmt: skip
        q = q.format(c=city) + (" Use fahrenheit." if fahrenheit else "")
        args = {"city": city, **({"unit": "fahrenheit"} if fahrenheit else {})}
        result, temp = self._weather_report(city, fahrenheit)
        answer = self.rng.choice(("It is {cond} in {c} right now, at {t}.", "In {c} it is currently {t} and {cond}.",
                                  "The weather in {c}: {cond}, {t}."))  # fmt: skip
        answer = answer.format(cond=result["condition"], c=city, t=temp)
        reasons = (f"The user asks about the weather in {city}. I will call get_weather.",
                   f"The tool says {temp} and {result['condition']} in {city}.")  # fmt: skip
        return self._tool_chat(
            WEATHER_TOOL, q, [_call("get_weather", args, "call_1")], [result], reasons, answer
        )

    def two_cities(self) -> str:
        a, b = self.rng.sample(CITIES, 2)
        q = f"Which is warmer right now, {a} or {b}?"
        calls = [_call("get_weather", {"city": a}, "call_1"), _call("get_weather", {"city": b}, "call_2")]
        (ra, ta), (rb, tb) = self._weather_report(a, False), self._weather_report(b, False)
        if ra["temperature"] == rb["temperature"]:
            answer = f"Both are at {ta}: {a} is {ra['condition']} and {b} is {rb['condition']}."
        else:
            warm, cold = ((a, ta), (b, tb)) if ra["temperature"] > rb["temperature"] else ((b, tb), (a, ta))
            answer = f"{warm[0]} is warmer: {warm[1]} against {cold[1]} in {cold[0]}."
        reasons = (f"I need the weather in both {a} and {b}; call get_weather twice.",
                   f"{a} is {ta} and {b} is {tb}.")  # fmt: skip
        return self._tool_chat(WEATHER_TOOL, q, calls, [ra, rb], reasons, answer)

    def calculator(self) -> str:
        a, b = self.rng.randint(100, 99_999), self.rng.randint(12, 9_999)
        op = self.rng.choice("+-*/")
        expression = f"{a} {op} {b}"
        value = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 4)}[op]
        q = self.rng.choice(("What is {e}?", "Calculate {e}.", "Can you compute {e} for me?", "{e} = ?"))
        q = q.format(e=expression)
        reasons = (f"{expression} is hard to do exactly in my head. I will use the calculator.",
                   f"The calculator returned {value}.")  # fmt: skip
        answer = self.rng.choice(("{e} = {v}.", "The result is {v}.")).format(e=expression, v=value)
        call = _call("calculator", {"expression": expression}, "call_1")
        return self._tool_chat(CALCULATOR_TOOL, q, [call], [{"result": value}], reasons, answer)

    def clock(self) -> str:
        city = self.rng.choice(CITIES)
        time = f"{self.rng.randint(0, 23):02d}:{self.rng.randint(0, 59):02d}"
        q = self.rng.choice(
            ("What time is it in {c}?", "What's the local time in {c}?", "Tell me the time in {c}.")
        )
        reasons = (f"The user wants the local time in {city}. I will call get_time.",
                   f"The tool says it is {time} in {city}.")  # fmt: skip
        answer = self.rng.choice(("It is {t} in {c}.", "The local time in {c} is {t}.")).format(
            t=time, c=city
        )
        call = _call("get_time", {"city": city}, "call_1")
        return self._tool_chat(TIME_TOOL, q.format(c=city), [call], [{"time": time}], reasons, answer)

    def tools_unused(self) -> str:
        """Tools are declared but the question needs none: the model answers directly."""
        thinking = self.rng.random() < 0.5
        task = self.rng.choice((self._small_talk, self._task))()
        tools = self._tools(self.rng.choice(ALL_TOOLS))
        history = self._opening() + [{"role": "user", "content": task[0]}]
        steps = [_assistant(task[2], (task[1] + " No tool is needed.") if thinking else None)]
        return self.render(history, steps, tools=tools, thinking=thinking)
