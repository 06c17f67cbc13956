// A route of an Inngest app, unchanged: it sends one event with the official
// SDK and knows nothing of the outbox. Started with
//   INNGEST_EVENT_API_BASE_URL=https://outbox.example.com  (the relay)
//   INNGEST_EVENT_KEY=<the key from `inngest-outbox keys add NAME`>
// its events are stored durably by the relay once `send` returns, and the
// outbox delivers them to Inngest with the ids `send` returned.
const { Inngest } = require("inngest");

const inngest = new Inngest({ id: "documents-app" });

// POST with a JSON body {v, ts, name, user, data}: a Fetch API route handler
// (Next.js app router, Remix, Hono, ...).
async function POST(request) {
  const { v, ts, name, user, data } = await request.json();
  const { ids } = await inngest.send({ v, ts, name, user, data });
  return Response.json({ ids });
}

module.exports = { POST, inngest };
