// A client that speaks only the original tutorial's protocol, written from
// DESIGN §2: routing key = command name, reply_to = direct reply-to, no
// correlation or message id, and it collects whatever arrives for a few seconds.
// It sends no user_id, so it is the anonymous user, unless a test has it say
// who it is (`userId`: the connection's own user) to act on that user's VMs.
import amqp from "amqplib";

export type TutorialReply = {
  "execution-info": { status: string; reason?: string; host?: string };
  response?: any;
};

export const tutorialSend = async (
  url: string,
  data: { command: string; options?: Record<string, unknown> },
  collectMs = 2000,
  userId?: string,
): Promise<TutorialReply[]> => {
  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createChannel();
    const replies: TutorialReply[] = [];
    await channel.consume(
      "amq.rabbitmq.reply-to",
      (msg) => {
        if (msg) replies.push(JSON.parse(msg.content.toString("utf8")));
      },
      { noAck: true },
    );
    channel.publish("computing", data.command, Buffer.from(JSON.stringify(data)), {
      replyTo: "amq.rabbitmq.reply-to",
      contentType: "application/json",
      ...(userId === undefined ? {} : { userId }),
    });
    await new Promise((resolve) => setTimeout(resolve, collectMs));
    return replies;
  } finally {
    await connection.close();
  }
};
