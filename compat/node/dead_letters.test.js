'use strict'
// Server-side maximum of attempts and dead-letter topics (knsq only) with nsqjs consumers whose
// own maxAttempts is off (0) and that requeue every message without backoff: each message is
// delivered --max-attempts times, then moves once to the dead-letter topic with its ID and
// body, is counted in /stats and /metrics, and a redrive brings it back to its channel only.

const assert = require('node:assert/strict')
const {brokerTest, Deliveries, sleep} = require('./harness')

const TOPIC = 'orders'

/** A reader that records every delivery and requeues it at once, never giving up itself. */
function failingReader(clients, topic, channel, deliveries) {
  return clients.reader(topic, channel, (message, reader) => {
    deliveries.add(message, reader)
    message.requeue(0, false)
  }, {maxAttempts: 0, maxInFlight: 10})
}

async function call(broker, method, path) {
  const {status, text} = await broker.http(method, path)
  assert.equal(status, 200, `${method} ${path}: ${status} ${text}`)
  return text ? JSON.parse(text) : null
}

async function createChannel(broker, topic, channel) {
  await call(broker, 'POST', `/topic/create?topic=${topic}`)
  await call(broker, 'POST', `/channel/create?topic=${topic}&channel=${channel}`)
}

async function deadLetteredMetric(broker, topic, channel) {
  const {text} = await broker.http('GET', '/metrics')
  const sample = `nsq_channel_dead_lettered_total{channel="${channel}",topic="${topic}"} `
  const line = text.split('\n').find((l) => l.startsWith(sample))
  assert.ok(line, `no ${sample} in /metrics`)
  return Number(line.slice(sample.length))
}

const deadLettered = (n) => (c) => c !== null && c.dead_lettered_count === n

brokerTest('a consumer that requeues everything sees each message --max-attempts times', {brokerArgs: ['--max-attempts=3']}, async ({broker, clients}) => {
  await createChannel(broker, TOPIC, 'billing')
  const deliveries = new Deliveries()
  failingReader(clients, TOPIC, 'billing', deliveries)
  await broker.waitForConsumers(TOPIC, 'billing', 1)
  const writer = await clients.writer()
  const sent = ['poison-0', 'poison-1', 'poison-2', 'poison-3']
  await clients.publish(writer, TOPIC, sent)

  const chan = await broker.waitForChannel(TOPIC, 'billing', deadLettered(4), '4 messages dead-lettered')
  await sleep(500) // nothing more may come
  const attempts = new Map()
  for (const d of deliveries.items) attempts.set(d.id, [...(attempts.get(d.id) || []), d.attempts])
  assert.equal(attempts.size, 4)
  for (const [id, seen] of attempts) assert.deepEqual(seen, [1, 2, 3], `message ${id}`)
  assert.equal(chan.max_attempts, 3)
  assert.equal(chan.dead_letter_topic, 'orders.billing.dlq')
  assert.equal(chan.requeue_count, 12)
  assert.equal(await deadLetteredMetric(broker, TOPIC, 'billing'), 4)

  const peeked = (await call(broker, 'GET', '/topic/peek?topic=orders.billing.dlq&count=10')).messages
  assert.deepEqual(peeked.map((m) => Buffer.from(m.body, 'base64').toString()), sent)
  for (const m of peeked) {
    assert.ok(attempts.has(m.id), `dead letter ${m.id} keeps its ID`)
    assert.deepEqual(
      [m.dead_letter.topic, m.dead_letter.channel, m.dead_letter.attempts, m.dead_letter.reason],
      [TOPIC, 'billing', 3, 'requeued']
    )
  }

  // An nsqjs consumer of the dead-letter topic gets the original bodies and IDs, once each.
  const dead = new Deliveries()
  clients.collectingReader('orders.billing.dlq', 'inspect', dead, {maxInFlight: 10})
  await dead.waitCount(4)
  await sleep(300)
  assert.deepEqual(dead.bodies().sort(), [...sent].sort())
  assert.deepEqual(new Set(dead.items.map((d) => d.id)), new Set(attempts.keys()))
  assert.ok(dead.items.every((d) => d.attempts === 1))
  clients.assertNoErrors()
})

brokerTest('redrive brings dead letters back to the channel they came from only', {}, async ({broker, clients}) => {
  await createChannel(broker, TOPIC, 'failing')
  await call(broker, 'POST', `/channel/create?topic=${TOPIC}&channel=fine`)
  const config = await call(broker, 'POST', `/channel/config?topic=${TOPIC}&channel=failing&max_attempts=2`)
  assert.equal(config.max_attempts, 2)

  const fine = new Deliveries()
  clients.collectingReader(TOPIC, 'fine', fine, {maxInFlight: 10})
  const failed = new Deliveries()
  const failing = failingReader(clients, TOPIC, 'failing', failed)
  await broker.waitForConsumers(TOPIC, 'fine', 1)
  await broker.waitForConsumers(TOPIC, 'failing', 1)
  const writer = await clients.writer()
  const sent = ['order-0', 'order-1', 'order-2', 'order-3', 'order-4']
  await clients.publish(writer, TOPIC, sent)
  await fine.waitCount(5)
  await broker.waitForChannel(TOPIC, 'failing', deadLettered(5), '5 dead letters')
  assert.equal(failed.items.length, 10)
  failing.close()
  await broker.waitForChannel(TOPIC, 'failing', (c) => c !== null && c.clients.length === 0, 'the failing consumer gone')

  await call(broker, 'POST', `/channel/config?topic=${TOPIC}&channel=failing&max_attempts=0`)
  await call(broker, 'POST', '/channel/create?topic=orders.failing.dlq&channel=replay')
  assert.deepEqual(await call(broker, 'POST', '/channel/redrive?topic=orders.failing.dlq&channel=replay&count=2'), {moved: 2})
  assert.deepEqual(await call(broker, 'POST', '/channel/redrive?topic=orders.failing.dlq&channel=replay&rate=100'), {moved: 3})

  const fixed = new Deliveries()
  clients.collectingReader(TOPIC, 'failing', fixed, {maxInFlight: 10})
  await fixed.waitCount(5)
  await sleep(500)
  assert.deepEqual(fixed.bodies(), sent, 'each redriven message once, in order')
  assert.ok(fixed.items.every((d) => d.attempts === 1), 'attempts reset')
  assert.equal(fine.items.length, 5, 'the other channel of the topic got nothing again')
  clients.assertNoErrors()
})

brokerTest('bad dead-letter settings are refused and change nothing', {}, async ({broker}) => {
  await createChannel(broker, TOPIC, 'c')
  for (const [query, status, message] of [
    ['topic=nope&channel=c&max_attempts=1', 404, 'TOPIC_NOT_FOUND'],
    [`topic=${TOPIC}&channel=nope&max_attempts=1`, 404, 'CHANNEL_NOT_FOUND'],
    [`topic=${TOPIC}&channel=c&max_attempts=100000`, 400, 'INVALID_ARG_MAX_ATTEMPTS'],
    [`topic=${TOPIC}&channel=c&max_attempts=1&dead_letter_topic=bad!name`, 400, 'INVALID_ARG_DEAD_LETTER_TOPIC'],
    [`topic=${TOPIC}&channel=c&max_attempts=1&dead_letter_topic=${TOPIC}`, 400, 'DEAD_LETTER_TOPIC_IS_SOURCE'],
  ]) {
    const {status: got, text} = await broker.http('POST', `/channel/config?${query}`)
    assert.deepEqual([got, JSON.parse(text)], [status, {message}], query)
  }
  const shown = await call(broker, 'GET', `/channel/config?topic=${TOPIC}&channel=c`)
  assert.deepEqual(shown.configured, {max_attempts: null, dead_letter_topic: null})
  assert.equal(shown.max_attempts, 0)
})
