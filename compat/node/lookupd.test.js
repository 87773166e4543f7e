'use strict'
// nsqjs's Reader finding brokers through knsq-lookupd, given only its HTTP address: one
// lookupd, three brokers registered with it, and every message published to any of them is
// consumed, as with nsqlookupd and nsqd.

const assert = require('node:assert/strict')
const {clusterTest, Deliveries, Reader, sleep} = require('./harness')

const TOPIC = 'lookupd_topic'
const CHANNEL = 'readers'
const PER_BROKER = 20

async function publish(broker, body) {
  const {status, text} = await broker.http('POST', `/pub?topic=${TOPIC}`, body)
  assert.equal(status, 200, `/pub answered ${status}: ${text}`)
}

clusterTest('Reader with lookupdHTTPAddresses consumes from three brokers', {brokers: 3}, async ({lookupd, brokers, readers}) => {
  // Each broker has the topic (and registers it) before the Reader starts.
  for (const broker of brokers) {
    const {status} = await broker.http('POST', `/topic/create?topic=${TOPIC}`)
    assert.equal(status, 200)
  }
  await lookupd.waitForProducers(TOPIC, brokers.map((b) => b.tcpAddress))

  const expected = []
  // Half before the Reader is connected (held in the topic), half after.
  for (const [i, broker] of brokers.entries()) {
    for (let n = 0; n < PER_BROKER / 2; n++) {
      expected.push(`b${i}-m${n}`)
      await publish(broker, `b${i}-m${n}`)
    }
  }

  const deliveries = new Deliveries()
  const errors = []
  const reader = new Reader(TOPIC, CHANNEL, {
    lookupdHTTPAddresses: [`http://${lookupd.httpAddress}`],
    lookupdPollInterval: 1,
    maxInFlight: 30,
    maxBackoffDuration: 1,
  })
  readers.push(reader)
  reader.on('error', (err) => errors.push(err))
  reader.on('message', (message) => {
    deliveries.add(message, reader)
    message.finish()
  })
  reader.connect()
  for (const broker of brokers) await broker.waitForConsumers(TOPIC, CHANNEL, 1)

  for (const [i, broker] of brokers.entries()) {
    for (let n = PER_BROKER / 2; n < PER_BROKER; n++) {
      expected.push(`b${i}-m${n}`)
      await publish(broker, `b${i}-m${n}`)
    }
  }

  await deliveries.waitCount(expected.length, 15000)
  await sleep(200) // nothing more (no duplicates) should follow
  assert.deepEqual([...deliveries.bodies()].sort(), [...expected].sort())
  assert.equal(reader.connectionIds.length, 3, `connected to ${reader.connectionIds}`)
  assert.deepEqual(errors.map(String), [])
})
