"""Pays for a chat completion on a Tessera hub with the official x402 Python client (v2),
unmodified: the hub answers 402 with its requirements, the client signs an EIP-3009
authorization of the hub's test stablecoin (allow-listed in the client's spend controls), the
hub settles it on-chain and serves. Prints one JSON object: status, text, settlement."""

import base64
import json
import os

from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import x402_requests
from x402.mechanisms.evm.exact.register import register_exact_evm_client

hub = os.environ["TESSERA_HUB"]
network = os.environ["TESSERA_NETWORK"]
client = x402ClientSync()
register_exact_evm_client(client, Account.from_key(os.environ["TESSERA_PAYER_KEY"]), networks=network)
client.set_spend_controls(
    {
        "allowed_assets": [
            {
                "network": network,
                "asset": os.environ["TESSERA_TOKEN"],
                "max_amount_per_payment": os.environ["TESSERA_SPEND_CAP"],
            }
        ]
    }
)
session = x402_requests(client)
response = session.post(
    f"{hub}/v1/chat/completions",
    json={
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
    },
    timeout=300,
)
settlement = response.headers.get("PAYMENT-RESPONSE")
body = response.json()
print(
    json.dumps(
        {
            "status": response.status_code,
            "text": (body.get("choices") or [{}])[0].get("message", {}).get("content"),
            "body": body,
            "settlement": json.loads(base64.b64decode(settlement)) if settlement else None,
        }
    )
)
