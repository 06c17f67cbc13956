// Sends events with the official JavaScript SDK, configured only by the
// environment (INNGEST_EVENT_API_BASE_URL, INNGEST_EVENT_KEY), as an app is.
// argv[2]: "sdk" (one event, then a batch) or "example" (the route in
// examples/send-event, called as its framework would). Prints the ids as JSON.
const path = require("node:path");

async function main() {
  const mode = process.argv[2];
  if (mode === "sdk") {
    const { Inngest } = require("inngest");
    const inngest = new Inngest({ id: "relay-test" });
    const one = await inngest.send({ name: "js/one", data: { n: 1 }, user: { id: "u1" }, v: "1" });
    const many = await inngest.send([
      { name: "js/batch", data: { n: 2 } },
      { name: "js/batch", data: { n: 3 }, id: "js-own-id", ts: 1700000000000 },
    ]);
    console.log(JSON.stringify({ one: one.ids, many: many.ids }));
  } else if (mode === "example") {
    const route = require(path.resolve(__dirname, "../../examples/send-event/route.cjs"));
    const body = JSON.parse(process.argv[3]);
    const response = await route.POST(
      new Request("http://app.local/api/documents", { method: "POST", body: JSON.stringify(body) }),
    );
    console.log(JSON.stringify(await response.json()));
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : String(error));
  process.exit(1);
});
