"""LangChain's `with_structured_output` against the hub (issue 12): the default method
(`json_schema`, i.e. `response_format`) and `function_calling` (a named tool) both return an
instance of the Pydantic model, whose fields validate.

Environment: TESSERA_HUB, TESSERA_KEY, TESSERA_MODEL. Prints one JSON line (a report) last."""

import json
import os

from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="The city's name", max_length=24)
    country: str = Field(description="The country", max_length=24)


llm = ChatOpenAI(base_url=os.environ["TESSERA_HUB"] + "/v1", api_key=os.environ["TESSERA_KEY"],
                 model=os.environ["TESSERA_MODEL"], temperature=0, max_tokens=60, max_retries=0)
report = {}
for method in ["default", "function_calling"]:
    kwargs = {} if method == "default" else {"method": method}
    city = llm.with_structured_output(City, **kwargs).invoke("Name a city in France and its country.")
    assert isinstance(city, City), (method, city)
    City.model_validate(city.model_dump())
    report[method] = city.model_dump()
print(json.dumps(report))
