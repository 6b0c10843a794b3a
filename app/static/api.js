// A small client for the service's REST API: JSON calls, the one error shape, SSE streaming.

/** An error from the API (or the network), carrying the service's {type, message, code, param}. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || "http_error";
    this.code = error.code || "http_error";
    this.param = error.param || null;
  }

  /** Build from a response status and its parsed body (the service's shape, or anything else). */
  static from(status, body) {
    if (body && typeof body === "object" && body.error && typeof body.error === "object") {
      return new ApiError(status, body.error);
    }
    const text = typeof body === "string" && body ? body.slice(0, 300) : `HTTP ${status}`;
    return new ApiError(status, { message: text });
  }

  /** A one-line description for the page: message, then status and code. */
  describe() {
    const where = this.param ? ` (${this.param})` : "";
    const status = this.status ? `HTTP ${this.status}, ` : "";
    return `${this.message}${where} [${status}${this.code}]`;
  }
}

async function readBody(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function networkError(err) {
  return new ApiError(0, {
    type: "network_error",
    code: "network_error",
    message: `Could not reach the server (${err.message})`,
  });
}

/** The client for one API key. */
export class Api {
  constructor(key) {
    this.key = key;
  }

  headers(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  /** Send a request; resolve to the JSON body (null for 204), or throw ApiError. */
  async request(method, path, { body, headers, signal } = {}) {
    const init = { method, headers: this.headers(headers), signal, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw networkError(err);
    }
    const data = response.status === 204 ? null : await readBody(response);
    if (!response.ok) throw ApiError.from(response.status, data);
    return data;
  }

  get(path, options) {
    return this.request("GET", path, options);
  }

  post(path, body, options = {}) {
    return this.request("POST", path, { ...options, body });
  }

  /** POST with stream: true and yield each parsed server-sent event's JSON data until [DONE]. */
  async *stream(path, body, { signal } = {}) {
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        headers: this.headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify({ ...body, stream: true }),
        signal,
        cache: "no-store",
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw networkError(err);
    }
    if (!response.ok) throw ApiError.from(response.status, await readBody(response));
    const type = response.headers.get("Content-Type") || "";
    if (!type.includes("text/event-stream")) {
      // A server that answered in one piece: hand it over as a single chunk.
      yield await readBody(response);
      return;
    }
    for await (const event of serverSentEvents(response.body)) {
      if (event.data === "[DONE]") return;
      let chunk;
      try {
        chunk = JSON.parse(event.data);
      } catch {
        continue; // a comment or keep-alive that is not JSON
      }
      if (chunk && chunk.error) throw ApiError.from(500, chunk);
      yield chunk;
    }
  }
}

/** Parse a text/event-stream body into {event, data} records (data lines joined by "\n"). */
export async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const record = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (record) yield record;
      }
    }
    const last = parseEvent(buffer);
    if (last) yield last;
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(block) {
  const data = [];
  let event = "message";
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    else if (line.startsWith("event:")) event = line.slice(6).trim();
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

/** The text piece of one streamed chunk (OpenAI chat or completion chunk, or our own shape). */
export function chunkText(chunk) {
  if (!chunk || typeof chunk !== "object") return "";
  const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
  if (choice) {
    if (choice.delta && typeof choice.delta.content === "string") return choice.delta.content;
    if (typeof choice.text === "string") return choice.text;
    if (choice.message && typeof choice.message.content === "string") return choice.message.content;
    return "";
  }
  return typeof chunk.text === "string" ? chunk.text : "";
}

/** The finish reason of a chunk, if it carries one. */
export function chunkFinish(chunk) {
  const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : null;
  return (choice && choice.finish_reason) || (chunk && chunk.finish_reason) || null;
}

/** A path segment, escaped. */
export function seg(value) {
  return encodeURIComponent(String(value));
}

/** A random idempotency key. */
export function newIdempotencyKey() {
  if (crypto.randomUUID) return `web-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}
