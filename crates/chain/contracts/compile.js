// Compiles the contracts with solcjs (the npm `solc` package, offline) into one JSON file of
// ABI and creation bytecode per contract: `node compile.js SOLC_PACKAGE_DIR OUT.json`.
const fs = require("fs");
const path = require("path");
const solc = require(process.argv[2]);
const sources = {};
for (const file of fs.readdirSync(__dirname).filter((f) => f.endsWith(".sol")).sort()) {
  sources[file] = { content: fs.readFileSync(path.join(__dirname, file), "utf8") };
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(1);
const artifacts = { compiler: solc.version(), contracts: {} };
for (const file of Object.keys(output.contracts).sort()) {
  for (const [name, c] of Object.entries(output.contracts[file])) {
    if (!c.evm.bytecode.object) continue; // interfaces
    artifacts.contracts[name] = { abi: c.abi, bytecode: "0x" + c.evm.bytecode.object };
  }
}
fs.writeFileSync(process.argv[3], JSON.stringify(artifacts, null, 1) + "\n");
